"""``nomadscale simulate`` runs the real service pieces over a day of the bundled trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nomadscale.cli.cmd_service import COMMANDS

pytestmark = pytest.mark.slow


def test_simulate_one_day_writes_summary_and_plot(tmp_path: Path) -> None:
    cmd = next(c for c in COMMANDS if c.name == "simulate")
    res = CliRunner().invoke(cmd, ["--days", "1", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["cycles"] == 72 and s["failed"] == 0 and s["applied"] > 0
    assert "no maintenance freeze" in s["policy_note"] and "p99 demand / 24" in s["policy_note"]
    assert s["start"] == "2000-01-03T12:20:00+00:00"  # after the warm-up SCORING.md uses
    assert s["availability"] >= 0.95
    assert 0 < s["cost_vs_static_peak"] < 1.0  # cheaper than holding the peak all along
    plot = Path(s["plot"])
    assert plot.parent == tmp_path and plot.stat().st_size > 20_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
