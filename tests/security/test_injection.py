"""Runbook parameters and templates cannot inject commands, paths or format attacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nomadscale.core.errors import NomadscaleError, UsageError
from nomadscale.healing.actions import IMAGE_RE, PRUNE_SCRIPT, _prune_job
from nomadscale.healing.runbook import PARAM_PATTERNS, check_runbook, render, template_fields
from tests.fuzz.counts import tried
from tests.fuzz.webhook_rig import ROOT, WebhookRig, webhook_rig

ATTACKS = [
    "../../etc/passwd",
    "/etc/shadow",
    "$(rm -rf /)",
    "`id`",
    "a;rm -rf /",
    "a && curl evil",
    "a|sh",
    "{__class__}",
    "{node.id.__class__.__mro__}",
    "%(x)s",
    "a\nb",
    "a b",
    "\x00",
    "${node.unique.id}",
]
TEMPLATE_ATTACKS = [
    "{__class__}",
    "{node.id.__class__}",
    "{node.id.__init__.__globals__}",
    "{node.id!r}",
    "{node.id:>100000000}",
    "{0}",
    "{}",
    "{node.id[0]}",
    "{runbook.__dict__}",
    "{",
    "}",
]


@pytest.fixture(scope="module")
def rig() -> Iterator[WebhookRig]:
    yield from webhook_rig()


@pytest.mark.parametrize("value", ATTACKS)
@pytest.mark.parametrize("param", ["node", "zone", "incident_id"])
def test_parameter_attacks_are_refused(rig: WebhookRig, param: str, value: str) -> None:
    tried("injection")
    assert not PARAM_PATTERNS[param].match(value)
    params = {"node": "gpu-0001", param: value}
    name = (
        "node-down"
        if param != "zone"
        else next(
            (n for n, rb in rig.engine.runbooks.items() if "zone" in rb.parameters), "node-down"
        )
    )
    with pytest.raises(UsageError, match=r"invalid value|unknown parameter"):
        rig.engine.submit(name, params, trigger="test", dry_run=True)


@pytest.mark.parametrize("value", ["..", ".", "-rf", "--help"])
def test_node_parameter_is_not_a_dot_segment_or_option(rig: WebhookRig, value: str) -> None:
    tried("injection")
    assert not PARAM_PATTERNS["node"].match(value)


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=70))
def test_any_accepted_node_parameter_is_a_plain_name(rig: WebhookRig, value: str) -> None:
    tried("injection")
    try:
        run = rig.engine.submit("node-down", {"node": value}, trigger="fuzz", dry_run=True)
    except NomadscaleError:
        return
    name = run["values"].get("node.name", value)
    for bad in ("/", "$", "`", ";", "{", "}", " ", "\n", "\x00", "|", "&", "%"):
        assert bad not in value and bad not in name


@pytest.mark.parametrize("template", TEMPLATE_ATTACKS)
def test_template_attacks_are_refused(template: str) -> None:
    tried("injection")
    with pytest.raises(ValueError):
        template_fields(template)


@pytest.mark.parametrize("template", TEMPLATE_ATTACKS)
def test_template_attacks_in_a_runbook_file(tmp_path: Path, template: str) -> None:
    data = yaml.safe_load((ROOT / "runbooks" / "node-down.yaml").read_text())
    data["steps"][0]["template"] = template
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    rb, errors = check_runbook(path)
    assert rb is None and errors
    assert all(e.startswith(f"{path}:") and "\n" not in e for e in errors)


def test_render_does_not_reexpand_values() -> None:
    values = {"node.name": "{run.id}", "run.id": "r1", "zone": "{__class__}"}
    out = render("node {node.name} in {zone} run {run.id}", values)
    assert out == "node {run.id} in {__class__} run r1"
    with pytest.raises(ValueError):
        render("{__class__}", values)


def test_title_regex_groups_are_limited(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "runbooks" / "node-down.yaml").read_text())
    data["triggers"]["pagerduty"][0]["title"] = "^down: (?P<path>.+)$"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    rb, errors = check_runbook(path)
    assert rb is None and any("named groups may only be" in e for e in errors)


@pytest.mark.parametrize(
    "image", ["$(rm -rf /)", "a;rm -rf /", "img\nrm", "img rm", "`id`", "'a'", '"a"']
)
def test_golden_image_is_data_never_script(image: str) -> None:
    """The prune job runs a FIXED script; the golden image reaches it only as an env var,
    and values that are not image references are refused before that."""
    tried("injection")
    assert not IMAGE_RE.match(image)
    job = _prune_job("prune-x", "node-1", "registry.example.com/a:b", "gpu")
    task = job["TaskGroups"][0]["Tasks"][0]
    assert task["Config"]["args"] == ["-c", PRUNE_SCRIPT]
    assert "registry.example.com/a:b" not in PRUNE_SCRIPT
    assert task["Env"] == {"GOLDEN_IMAGE": "registry.example.com/a:b"}
