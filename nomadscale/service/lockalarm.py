"""The alert for a leader lock nobody can take: the lock store (Consul) unreachable for
2 x TTL means no instance can act. Raised once, resolved when the store answers again."""

from __future__ import annotations

from nomadscale.core.clock import Clock
from nomadscale.core.errors import NomadscaleError
from nomadscale.service.records import Recorder

LOCK_ALERT = "nomadscale/lock-unavailable"


class LockAlarm:
    def __init__(self, *, recorder: Recorder, clock: Clock, ttl_s: float) -> None:
        self.recorder = recorder
        self.clock = clock
        self.ttl_s = ttl_s
        self.down_since: float | None = None  # clock.monotonic() of the first failure
        self.alerted = False

    def unreachable(self, error: NomadscaleError) -> None:
        """An election failed: alert once it has failed for 2 x TTL."""
        now = self.clock.monotonic()
        if self.down_since is None:
            self.down_since = now
        down_s = now - self.down_since
        if not self.alerted and down_s >= 2 * self.ttl_s:
            self.alerted = True
            self.recorder.alert(
                LOCK_ALERT, on=True,
                summary=f"nomadscale cannot reach its leader lock for {down_s:.0f}s: "
                "no autoscaling decisions are applied",
                details={"error": str(error), "down_s": round(down_s, 1)},
            )  # fmt: skip

    def reachable(self) -> None:
        """An election ran: resolve the alert if it was raised."""
        self.down_since = None
        if self.alerted:
            self.alerted = False
            self.recorder.alert(LOCK_ALERT, on=False, summary="", details={})
