"""Quality: for every development trace with >= 100 scored cycles, the reference scorer's
table plus nomadscale's row (default settings, no per-trace tuning)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from devtraces import cheapest_tuned, scored_traces

from nomadscale.backtest.runner import run_backtest, write_decisions
from nomadscale.stages.forecast import ForecastConfig

SCORER = Path("/work/shared/bench/score.py")


def main() -> None:
    for path, rate, p in scored_traces(sys.argv[1:]):
        rep = run_backtest(rate, p, config=ForecastConfig(), anchors=True)
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "d.csv"
            write_decisions(out, p, rep.decisions["nomadscale"])
            if SCORER.exists():
                r = subprocess.run(
                    [sys.executable, str(SCORER), path, "--decisions", str(out)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                print(r.stdout.replace("candidate  ", "nomadscale ").rstrip())
        m = rep.rows["nomadscale"]
        models: dict[str, int] = {}
        for x in rep.replay.models:
            models[x] = models.get(x, 0) + 1
        name, best = cheapest_tuned(rep.rows)
        ok = m.availability >= 0.99 and m.cost_vs_oracle <= best
        print(
            f"  nomadscale: avail {m.availability * 100:.2f}% cost/oracle {m.cost_vs_oracle:.3f}"
            f"  models {models}\n  cheapest tuned anchor {name} {best:.3f}: "
            f"{'beaten' if ok else 'NOT beaten'}\n"
        )


if __name__ == "__main__":
    main()
