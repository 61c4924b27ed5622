"""Live rollout progress with rich: nodes prefetched, canary, nodes updated, current SLI,
the last re-plan before a node step (and a hold)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from nomadscale.deploy.state import RolloutState


def status_table(
    st: RolloutState, info: dict[str, Any] | None = None, *, now: datetime | None = None
) -> Table:
    """The record as a table; ``now`` (``deploy status``) adds how long ago an active
    rollout last made progress: a record nobody drives any more (its process was killed)
    shows as one whose last progress is old, with the process that drove it."""
    info = info or {}
    t = Table(title=f"deploy {st.policy}: {st.image}", title_justify="left", show_header=False)
    t.add_row("rollout", f"{st.id} [bold]{st.status}[/bold]")
    t.add_row("previous image", str(st.previous_image))
    pf = st.prefetch
    if pf.get("ok") is not None or info.get("phase") == "prefetch":
        ok = info.get("ok", len(pf.get("ok") or []))
        total = info.get("total", ok + len(pf.get("failed") or {}))
        failed = pf.get("failed") or {}
        t.add_row(
            "prefetched", f"{ok}/{total} nodes" + (f", failed {len(failed)}" if failed else "")
        )
    t.add_row("zones done", ", ".join(st.zones_done) or "-")
    rolling = st.active and bool(st.current_zone) and st.current_zone not in st.zones_done
    if rolling:
        # the live counts only while this process follows the deployment (not in `status`)
        counts = (f"{info['healthy']}/{info['total']} healthy, " if "healthy" in info
                  else "")  # fmt: skip
        t.add_row("zone", f"{st.current_zone}: {counts}deployment "
                  f"{(st.deployment_id or '-')[:8]} {info.get('deployment', '')}".rstrip())  # fmt: skip
    sli = info.get("sli") or st.sli.get("last")
    if sli:
        t.add_row("SLI", f"{sli.get('verdict')}: {sli.get('reason')}")
    if st.surge:
        s = st.surge
        state = (" (dropped: Nomad could not place it)" if s.get("dropped")
                 else " (released)" if s.get("released")
                 else f" (not placed: {s['blocked']})" if s.get("blocked") else "")  # fmt: skip
        t.add_row("surge", f"{s['group']} {s['from']} -> {s['to']}{state}")
    last = st.replan.get("last") or {}
    if last.get("explain") and rolling:
        t.add_row("re-plan", f"{last['explain']} (at {last.get('at', '?')})")
    if st.status == "held" and st.replan.get("held_since"):
        t.add_row("held since", str(st.replan["held_since"]))
    if st.reason:
        t.add_row("reason", st.reason)
    if st.active and st.log:
        t.add_row("last event", st.log[-1])
    t.add_row("started", st.started_at)
    if st.active and st.updated_at:
        t.add_row("last progress", st.updated_at + _ago(st.updated_at, now))
    if st.active and st.owner:
        t.add_row("driven by", st.owner)
    if st.finished_at:
        t.add_row("finished", f"{st.finished_at} ({st.timings.get('total_s', 0) / 60:.1f} min)")
    return t


def _ago(iso: str, now: datetime | None) -> str:
    if now is None:
        return ""
    try:
        s = (now - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return ""
    if s < 90:
        return f" ({max(0.0, s):.0f}s ago)"
    if s < 2 * 3600:
        return f" ({s / 60:.0f} min ago)"
    return f" ({s / 3600:.0f} h ago)" if s < 2 * 86400 else f" ({s / 86400:.0f} days ago)"


class LiveProgress:
    """A ``Reporter`` that redraws the status table (on stderr) while the rollout runs. The
    table goes away when it stops: the command prints the final record once, on stdout."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=True)

    def __enter__(self) -> LiveProgress:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def __call__(self, st: RolloutState, info: dict[str, Any]) -> None:
        self.live.update(status_table(st, info))
