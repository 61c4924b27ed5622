"""Nomad API answers: the adapter's parsers take any JSON shape (Go's nulls, wrong types, huge
numbers, a proxy's HTML turned JSON) and give parsed values or a clear nomadscale error, never
KeyError/TypeError/OverflowError."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomadscale.core.errors import ExternalPermanentError, InputError
from nomadscale.integrations import nomad_parse as parse
from tests.fuzz.counts import tried
from tests.fuzz.strategies import json_values

KEYS = [
    "ID", "Name", "Namespace", "Type", "Status", "Stop", "Version", "Stable", "JobModifyIndex",
    "TaskGroups", "Meta", "NodePool", "ParameterizedJob", "Count", "PreviousCount", "Time",
    "Message", "Error", "Events", "Desired", "Placed", "Running", "Healthy", "Unhealthy",
    "JobID", "JobStopped", "Drain", "DrainStrategy", "Datacenter", "SchedulingEligibility",
    "CreateIndex", "ModifyIndex", "DeploymentStatus", "TaskStates", "TaskGroup", "NodeID",
    "NodeName", "DesiredStatus", "ClientStatus", "JobVersion", "DeploymentID", "Canary",
    "State", "Failed", "DesiredTotal", "PlacedAllocs", "HealthyAllocs", "UnhealthyAllocs",
    "DesiredCanaries", "PlacedCanaries", "Promoted", "AutoRevert", "AutoPromote",
    "RequireProgressBy", "StatusDescription", "Dynamic", "Static",
]  # fmt: skip
NASTY = st.sampled_from(
    [
        None, 10**30, -(10**30), float("inf"), float("nan"), 1e308, "1e400", "9" * 5000, True,
        "0001-01-01T00:00:00Z", "2026-01-05T00:00:00.123456789Z", "2026-99-99T", [], {}, "x",
        [1, 2], {"a": None},
    ]
)  # fmt: skip
value = st.one_of(NASTY, json_values)
nomad_docs = st.recursive(
    st.dictionaries(st.sampled_from(KEYS), value, max_size=8),
    lambda inner: (
        st.dictionaries(
            st.sampled_from(KEYS), st.one_of(value, inner, st.lists(inner, max_size=3)), max_size=6
        )
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=20,
)
PARSERS: dict[str, Any] = {
    "job_info": parse.job_info,
    "scale_event": parse.scale_event,
    "job_status": lambda d: parse.job_status(d, active_deployment=None, namespace="default"),
    "node_info": parse.node_info,
    "alloc_info": parse.alloc_info,
    "deployment_info": parse.deployment_info,
    "node_metadata": lambda d: parse.node_metadata("n1", d),
}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(PARSERS)), doc=nomad_docs)
def test_parsers_take_any_json_shape(name: str, doc: dict[str, Any]) -> None:
    tried("nomad-parse")
    with contextlib.suppress(ExternalPermanentError, InputError):
        PARSERS[name](doc)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(v=value)
def test_time_parsers(v: Any) -> None:
    tried("nomad-parse", 2)
    t = parse.rfc3339(v)
    assert t is None or t.tzinfo is not None
    with contextlib.suppress(ExternalPermanentError, InputError):
        parse.ns_time(v)


KNOWN_SHAPES = [
    ("job_info", {"TaskGroups": 5}, "TaskGroups"),
    ("job_info", {"Version": float("inf")}, "Version"),
    ("scale_event", {"Time": 10**30}, "Time"),
    ("job_status", {"TaskGroups": {"a": {"Events": 3}}}, "TaskGroups.a.Events"),
    ("deployment_info", {"TaskGroups": {"a": {"PlacedCanaries": 3}}}, "PlacedCanaries"),
    ("alloc_info", {"CreateIndex": float("inf")}, "CreateIndex"),
]


@pytest.mark.parametrize(
    ("name", "doc", "field"), KNOWN_SHAPES, ids=[f"{n}-{d}" for n, d, _ in KNOWN_SHAPES]
)
def test_shapes_found_by_fuzzing(name: str, doc: dict[str, Any], field: str) -> None:
    """A malformed answer is a one-line permanent Nomad error naming the field."""
    tried("nomad-parse")
    with pytest.raises(ExternalPermanentError) as err:
        PARSERS[name](doc)
    assert err.value.system == "nomad"
    assert field in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_go_nulls_are_zero_values(name: str) -> None:
    """Like Go's client, null and missing fields decode to zero values, not errors."""
    doc = {k: None for k in KEYS}
    assert PARSERS[name](doc) == PARSERS[name]({})
