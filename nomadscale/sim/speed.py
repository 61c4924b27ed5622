"""A clock running ``speed`` times faster than the wall clock (for ``nomadscale sim serve``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class ScaledClock:
    """Virtual time = start + speed x real elapsed time. ``speed=1`` is the wall clock."""

    def __init__(self, speed: float = 1.0, start: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = float(speed)
        self._start = start or datetime.now(UTC)
        self._t0 = time.monotonic()

    def monotonic(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self.monotonic())

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds / self.speed)

    def __repr__(self) -> str:
        return f"ScaledClock(speed={self.speed})"
