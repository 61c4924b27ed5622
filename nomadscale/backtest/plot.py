"""Plot of a backtest: demand vs provisioned capacity, with the forecast band."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nomadscale.backtest.protocol import effective_workers
from nomadscale.backtest.runner import Report
from nomadscale.core.errors import InputError


def plot_report(report: Report, rate: np.ndarray, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = report.params
    b0 = int(p.boundaries[0])
    eff, _ = effective_workers(report.decisions["nomadscale"], p)
    n = len(eff)
    t = np.arange(n) * p.step_min / 60.0  # hours from the first boundary
    tc = (p.boundaries - b0) * p.step_min / 60.0
    fig, ax = plt.subplots(figsize=(12, 4.5))
    rep = report.replay
    ax.fill_between(tc, rep.peak, rep.upper, step="post", alpha=0.25, color="tab:orange",
                    label="forecast peak .. upper bound")  # fmt: skip
    ax.plot(t, rate[b0 : b0 + n], lw=0.8, color="tab:blue", label="demand (req/min)")
    ax.step(t, eff * p.capacity_rpm, where="post", lw=1.0, color="tab:green",
            label="nomadscale capacity")  # fmt: skip
    orc = np.repeat(report.decisions["oracle"], p.cycle_steps) * p.capacity_rpm
    ax.step(t, orc, where="post", lw=0.6, ls=":", color="grey", label="oracle capacity")
    m = report.rows["nomadscale"]
    ax.set_title(
        f"nomadscale: availability {m.availability * 100:.2f}%, cost/oracle {m.cost_vs_oracle:.3f}"
    )
    ax.set_xlabel(f"hours since {p.time_of(b0).strftime('%Y-%m-%d %H:%M')} UTC")
    ax.set_ylabel("requests / min")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=110)
    except (OSError, ValueError) as e:
        raise InputError(f"--plot {path}: cannot write: {e}") from None
    finally:
        plt.close(fig)
