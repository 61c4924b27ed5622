"""The SLI gate: error rate and latency of the new image against the policy's limits."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nomadscale.config.policy_sections import SLI
from nomadscale.core.errors import TemporaryError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GateResult:
    verdict: str  # pass / breach / no-data
    error_rate: float | None
    latency_s: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "error_rate": self.error_rate,
            "latency_s": self.latency_s,
            "reason": self.reason,
        }


class SLIGate:
    """``check(image, at)``: queries with ``{image}`` replaced by the image reference."""

    def __init__(self, *, sli: SLI | None, prometheus: Any | None) -> None:
        self.sli = sli
        self.prometheus = prometheus

    @property
    def enabled(self) -> bool:
        return self.sli is not None and self.prometheus is not None

    def check(self, image: str, *, at: datetime) -> GateResult:
        if self.sli is None or self.prometheus is None:
            return GateResult("pass", None, None, "no SLI gate configured")
        s = self.sli
        try:
            err = self.prometheus.query(s.error_rate_query.replace("{image}", image), at=at)
            lat = None
            if s.latency_query:
                lat = self.prometheus.query(s.latency_query.replace("{image}", image), at=at)
        except TemporaryError as e:
            return GateResult("no-data", None, None, f"prometheus unavailable: {e}")
        err = None if err is None or math.isnan(err) else err
        lat = None if lat is None or math.isnan(lat) else lat
        max_lat = s.max_latency.total_seconds() if s.max_latency is not None else None
        if err is not None and err > s.max_error_rate:
            return GateResult(
                "breach", err, lat, f"error rate {err:.4f} > {s.max_error_rate:g} for {image}"
            )
        if lat is not None and max_lat is not None and lat > max_lat:
            return GateResult("breach", err, lat, f"p95 latency {lat:.3f}s > {max_lat:g}s")
        if err is None or (s.latency_query and lat is None):
            return GateResult("no-data", err, lat, f"no SLI data yet for {image}")
        return GateResult("pass", err, lat, f"error rate {err:.4f}, latency {lat or 0:.3f}s")
