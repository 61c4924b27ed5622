"""Plot of a backtest: demand vs provisioned capacity, with the forecast band."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from nomadscale.backtest.outputs import write_files
from nomadscale.backtest.protocol import effective_workers
from nomadscale.backtest.runner import Report
from nomadscale.core.errors import InputError, UsageError


def plot_format(option: str, path: str | Path) -> str:
    """The image format ``path`` asks for by its suffix (png without one); UsageError for a
    suffix matplotlib cannot write, before any work is done."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    from matplotlib.backend_bases import FigureCanvasBase

    if suffix not in FigureCanvasBase.get_supported_filetypes():
        raise UsageError(
            f"{option} {path}: cannot draw a '.{suffix}' file (use .png, .svg or .pdf)"
        )
    return suffix


def plot_report(report: Report, rate: np.ndarray, path: str | Path) -> None:
    """Draw the replay into ``path`` (written atomically)."""
    data = render_plot(report, rate, fmt=plot_format("--plot", path))
    write_files([("--plot", path, data)])


def render_plot(report: Report, rate: np.ndarray, *, fmt: str = "png") -> bytes:
    """The replay drawn as an image in ``fmt``: demand, nomadscale's capacity, the forecast
    band and the oracle."""
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
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=110)
    except ValueError as e:
        raise InputError(f"cannot draw the plot as {fmt}: {e}") from None
    finally:
        plt.close(fig)
    return buf.getvalue()
