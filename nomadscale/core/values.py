"""Frozen value types shared by the decision pipeline, the service and the CLI.

Every decision nomadscale makes is one of these immutable records: it is logged, stored in
Consul KV and exported as metrics, and it explains itself in one line (``explain()``).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"

    @staticmethod
    def of(current: int | None, desired: int) -> Direction:
        if current is None or desired > current:
            return Direction.UP
        if desired < current:
            return Direction.DOWN
        return Direction.HOLD


@dataclass(frozen=True, slots=True)
class Forecast:
    """Predicted demand (requests per minute) over the window a decision must cover."""

    peak: float  # point forecast of the peak demand over the horizon
    upper: float  # upper bound meeting the target availability (peak + headroom)
    model: str  # model (or blend) that produced ``peak``
    horizon_s: float  # seconds covered: cycle + lead time
    target: float  # availability the upper bound aims at
    headroom: float  # upper / peak - 1 (relative), 0 when peak is 0
    data_ok: bool = True  # False when history was missing or too stale to trust
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ZoneCount:
    zone: str
    count: int
    group: str = ""  # Nomad task group serving this zone


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one cycle for one policy: how many workers, where, and why."""

    policy: str
    decided_at: datetime
    desired: int
    current: int | None
    direction: Direction
    reason: str
    zones: tuple[ZoneCount, ...] = ()
    forecast: Forecast | None = None
    bounds_hit: tuple[str, ...] = ()
    override: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def explain(self) -> str:
        """One line a human can read in a log or on a PagerDuty incident."""
        cur = "?" if self.current is None else str(self.current)
        parts = [f"{self.policy}: {cur} -> {self.desired} ({self.direction.value})"]
        if self.zones:
            parts.append("zones " + ",".join(f"{z.zone}={z.count}" for z in self.zones))
        if self.forecast is not None:
            f = self.forecast
            parts.append(
                f"forecast {f.peak:.1f} rpm by {f.model}, upper {f.upper:.1f} "
                f"(+{f.headroom * 100:.0f}% for {f.target:.3g})"
            )
        if self.bounds_hit:
            parts.append("bounds " + ",".join(self.bounds_hit))
        if self.override:
            parts.append(f"override {self.override}")
        parts.append(self.reason)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "policy": self.policy,
            "decided_at": self.decided_at.isoformat(),
            "desired": self.desired,
            "current": self.current,
            "direction": self.direction.value,
            "reason": self.reason,
            "zones": [asdict(z) for z in self.zones],
            "forecast": self.forecast.to_dict() if self.forecast else None,
            "bounds_hit": list(self.bounds_hit),
            "override": self.override,
            "meta": dict(self.meta),
            "explain": self.explain(),
        }


def new_id() -> str:
    return uuid.uuid4().hex[:12]
