"""Property: no edit of the shipped policy makes the loader fail with anything but
ConfigError, and every error line is ``file:line: field: message``."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomadscale.config.validate import load_policy
from nomadscale.core.errors import ConfigError
from tests.config.helpers import ERROR_LINE, shipped_data

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["20m", "0s", "-1", "24:00", "odd-even", "* * * * *", "Asia/Jakarta"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))
KEYS = st.one_of(st.text(max_size=10), st.integers(), st.sampled_from(["min", "cylce", "lst"]))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


ALL_PATHS = _paths(shipped_data())


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    data: Any = copy.deepcopy(shipped_data())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(ALL_PATHS))
        kind = draw(st.sampled_from(["delete", "set", "junk"]))
        if not path:
            if kind == "set":
                return draw(VALUES)
            continue
        parent: Any = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            if kind == "delete":
                del parent[path[-1]]
            elif kind == "set":
                parent[path[-1]] = draw(VALUES)
            elif isinstance(parent[path[-1]], dict):
                parent[path[-1]][draw(KEYS)] = draw(VALUES)
            else:
                parent[path[-1]] = {draw(KEYS): draw(VALUES)}
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_fail_only_with_well_formed_config_errors(data: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        try:
            load_policy(path)
        except ConfigError as exc:
            assert exc.errors
            for line in exc.errors:
                assert re.match(ERROR_LINE, line), line
                assert "\n" not in line


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_policy(path)
        except ConfigError as exc:
            assert all(re.match(ERROR_LINE, ln) for ln in exc.errors), exc.errors
