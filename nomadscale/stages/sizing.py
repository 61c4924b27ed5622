"""Total sizing: workers = ceil(forecast upper / capacity per worker), within the bounds.

Order: raw count, then the step limits relative to the current count, the scale-down
cooldown (from the target's last scale event, whoever made it), the rule never to scale
down on missing data, and finally min/max. Every limit that changed the count is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from nomadscale.core.errors import InputError
from nomadscale.core.values import Forecast


@dataclass(frozen=True)
class Bounds:
    min: int = 2
    max: int = 10**6
    max_step_up: int | None = None
    max_step_down: int | None = None
    scale_down_cooldown_s: float = 0

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < self.min:
            raise InputError(f"bounds: need 0 <= min <= max, got min={self.min} max={self.max}")
        for name in ("max_step_up", "max_step_down"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"bounds.{name}: must be at least 1, got {v}")
        if self.scale_down_cooldown_s < 0:
            raise InputError("bounds.scale_down_cooldown: must not be negative")


@dataclass(frozen=True)
class Sizing:
    count: int
    raw: int
    reason: str
    bounds_hit: tuple[str, ...]


def size(
    *,
    forecast: Forecast,
    capacity_rpm: float,
    current: int | None,
    bounds: Bounds,
    now: datetime,
    last_scale_at: datetime | None,
) -> Sizing:
    if not capacity_rpm > 0 or not math.isfinite(capacity_rpm):
        raise InputError(f"capacity per worker must be a positive number, got {capacity_rpm}")
    upper = forecast.upper
    if not math.isfinite(upper) or upper < 0:
        raise InputError(f"forecast upper bound must be a finite non-negative number: {upper}")
    raw = math.ceil(upper / capacity_rpm - 1e-9)
    n = raw
    hit: list[str] = []
    why = f"{upper:.1f} rpm / {capacity_rpm:g} rpm per worker = {raw}"
    if current is not None:
        if bounds.max_step_up is not None and n > current + bounds.max_step_up:
            n = current + bounds.max_step_up
            hit.append("max_step_up")
        if bounds.max_step_down is not None and n < current - bounds.max_step_down:
            n = current - bounds.max_step_down
            hit.append("max_step_down")
        if n < current and not forecast.data_ok:
            n = current
            hit.append("no_data_hold")
            why += "; demand history missing: not scaling down"
        if n < current and bounds.scale_down_cooldown_s > 0 and last_scale_at is not None:
            since = (now - last_scale_at).total_seconds()
            if since < bounds.scale_down_cooldown_s:
                n = current
                hit.append("scale_down_cooldown")
                why += f"; last scale {since:.0f}s ago < cooldown {bounds.scale_down_cooldown_s:g}s"
    if n < bounds.min:
        n = bounds.min
        hit.append("min")
    if n > bounds.max:
        n = bounds.max
        hit.append("max")
    return Sizing(count=n, raw=raw, reason=why, bounds_hit=tuple(hit))
