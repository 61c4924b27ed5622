"""nomadscale's backtest agrees with the reference scorer (SCORING.md) on the same decisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nomadscale.backtest.protocol import make_params
from nomadscale.backtest.runner import run_backtest, write_decisions
from nomadscale.stages.forecast import ForecastConfig
from nomadscale.stages.history import load_trace

SHARED = Path("/work/shared")
SCORER = SHARED / "bench" / "score.py"
TRACES = sorted((SHARED / "traces").glob("*.csv")) if SHARED.exists() else []


def _dev_traces() -> list[Path]:
    return [t for t in TRACES if len(make_params(load_trace(t)).boundaries) >= 100]


@pytest.mark.skipif(not SCORER.exists(), reason="/work/shared (reference scorer) is absent")
@pytest.mark.parametrize("trace", _dev_traces(), ids=lambda p: p.name)
def test_metrics_agree_with_reference_scorer(trace: Path, tmp_path: Path) -> None:
    tr = load_trace(trace)
    p = make_params(tr)
    report = run_backtest(tr.series.values, p, config=ForecastConfig())
    out = tmp_path / "decisions.csv"
    write_decisions(out, p, report.decisions["nomadscale"])
    r = subprocess.run(
        [sys.executable, str(SCORER), str(trace), "--decisions", str(out), "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    ref = json.loads(r.stdout)
    ours = {("candidate" if k == "nomadscale" else k): m for k, m in report.rows.items()}
    assert set(ours) == set(ref)  # same anchors and the same hindsight-tuned multipliers
    for name, m in ref.items():
        got = ours[name]
        assert got.availability == pytest.approx(m["availability"], abs=1e-12), name
        assert got.served == pytest.approx(m["served"], rel=1e-9), name
        assert got.worker_hours == pytest.approx(m["worker_hours"], rel=1e-9), name
        assert got.cost_vs_oracle == pytest.approx(m["cost_vs_oracle"], rel=1e-9), name


@pytest.mark.skipif(not SCORER.exists(), reason="/work/shared (reference scorer) is absent")
@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_boundaries_and_capacity_agree(trace: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(SCORER), str(trace), "--params"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    ref = json.loads(r.stdout)
    p = make_params(load_trace(trace))
    assert p.capacity_rpm == pytest.approx(ref["capacity_per_worker_rpm"], rel=1e-12)
    assert (p.cycle_steps, p.lead_steps, p.warmup_steps) == (
        ref["cycle_steps"], ref["lead_steps"], ref["warmup_steps"],
    )  # fmt: skip
    assert len(p.boundaries) == ref["cycles"]
    assert p.time_of(int(p.boundaries[0])).strftime("%Y-%m-%dT%H:%M:%SZ") == ref["first_boundary"]
