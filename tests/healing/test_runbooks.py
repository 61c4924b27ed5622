"""Runbook files: the shipped ones load; mistakes are reported as file:line: field: message."""

from pathlib import Path

import pytest

from nomadscale.core.errors import ConfigError
from nomadscale.healing.runbook import check_runbook, load_runbooks, render, template_fields

RUNBOOKS = Path(__file__).resolve().parents[2] / "runbooks"


def test_shipped_runbooks_load() -> None:
    rbs = load_runbooks([RUNBOOKS])
    assert set(rbs) >= {
        "gpu-host-maintenance",
        "node-down",
        "gpu-xid-error",
        "stuck-allocation",
        "disk-pressure-images",
    }
    ghm = rbs["gpu-host-maintenance"]
    assert ghm.triggers.maintenance is not None
    assert [s.action for s in ghm.steps][:3] == ["notify", "mark_ineligible", "surge"]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rb.yaml"
    p.write_text(text)
    return p


def test_every_error_with_line_and_field(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "name: bad-one\n"  # 1
        "parameters:\n"  # 2
        "  node: {}\n"  # 3
        "steps:\n"  # 4
        "  - action: drain\n"  # 5
        "    deadline: soon\n"  # 6
        "  - action: reboot\n"  # 7
        "  - action: wait_node\n"  # 8
        "    status: ready\n"  # 9
        "    colour: blue\n",  # 10
    )
    rb, errors = check_runbook(p)
    assert rb is None
    assert (
        f"{p}:6: steps[0].deadline: not a duration: 'soon' (use e.g. 90s, 20m, 1h30m, 2d)" in errors
    )
    assert any(e.startswith(f"{p}:7: steps[1]") and "reboot" in e for e in errors)
    assert f"{p}:10: steps[2].colour: unknown field" in errors
    assert len(errors) == 3


def test_template_may_use_only_validated_fields(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "name: t\nparameters:\n  node: {}\nsteps:\n"
        "  - action: notify\n    template: 'hi {event.data.title}'\n",
    )
    _, errors = check_runbook(p)
    assert len(errors) == 1 and errors[0].startswith(f"{p}:6: steps[0].template: unknown template")
    with pytest.raises(ValueError, match="no format spec"):
        template_fields("{node.id!r}")
    with pytest.raises(ValueError, match="unknown template field"):
        template_fields("{node.__class__}")
    assert render("{node.name} in {zone} ({incident.id})", {"node.name": "n1", "zone": "a"}) == (
        "n1 in a (-)"
    )


def test_cross_checks(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: x\nsteps:\n  - action: drain\n")
    _, errors = check_runbook(p)
    assert errors == [f"{p}:3: steps[0]: drain needs a 'node' parameter"]
    p = _write(
        tmp_path,
        "name: x\nparameters: {node: {}}\ntriggers:\n  pagerduty:\n"
        "    - title: '(?P<host>.*)'\nsteps:\n  - action: mark_ineligible\n",
    )
    _, errors = check_runbook(p)
    assert len(errors) == 1 and ":5: triggers.pagerduty[0].title:" in errors[0]


def test_duplicate_names_and_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: same\nsteps:\n  - {action: notify, template: x}\n")
    (tmp_path / "b.yaml").write_text("name: same\nsteps:\n  - {action: notify, template: y}\n")
    (tmp_path / "c.yaml").write_text("name: c\nsteps: [\n")
    with pytest.raises(ConfigError) as ei:
        load_runbooks([tmp_path])
    errs = ei.value.errors
    assert any("b.yaml:1: name: 'same' already defined" in e for e in errs)
    assert any("c.yaml:" in e and "yaml:" in e for e in errs)
