"""Prometheus HTTP API client (requests): demand history and SLI gates.

* ``PrometheusClient.query_range(expr, start=, end=, step_s=)`` -> ``DemandSeries`` on the
  fixed grid ``start, start+step, ..., <= end`` (NaN where Prometheus has no sample). Ranges
  longer than ``max_points`` steps are split into several requests (Prometheus refuses more
  than 11,000 points per series).
* ``PrometheusClient.query(expr, at=None)`` -> float | None: an instant scalar or
  one-element vector; None when the result is empty. Several series -> ExternalPermanentError.
* ``PrometheusDemandSource(client=, query=, stamp="end")`` -> ``core.ports.DemandSource``.

Errors: connection, timeout, 5xx, 429, 503 -> ExternalTemporaryError(system="prometheus");
400/422 (bad query) -> ExternalPermanentError with Prometheus' own error text; 401/403 ->
ExternalPermanentError.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import requests

from nomadscale.core.clock import utc
from nomadscale.core.errors import (
    ExternalPermanentError,
    ExternalTemporaryError,
    InputError,
    UsageError,
)
from nomadscale.core.ports import DemandSeries

log = logging.getLogger(__name__)
SYSTEM = "prometheus"
MAX_POINTS = 10_000  # below Prometheus' hard limit of 11,000 points per series


def _short(text: str, limit: int = 300) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def _ts(dt: datetime) -> float:
    return utc(dt).timestamp()


class PrometheusClient:
    def __init__(
        self,
        *,
        url: str,
        timeout: float = 10.0,
        bearer_token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        verify: bool | str = True,
        max_points: int = MAX_POINTS,
    ) -> None:
        base = url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"prometheus url {url!r}: use http://host:port or https://host:port")
        if bearer_token and basic_auth:
            raise UsageError("prometheus: give a bearer token or basic auth, not both")
        if not 1 <= max_points <= 11_000:
            raise UsageError(f"prometheus max_points {max_points}: must be 1..11000")
        self.url = base
        self.timeout = float(timeout)
        self.max_points = max_points
        self._session = requests.Session()
        self._session.verify = verify
        if bearer_token:
            self._session.headers["Authorization"] = f"Bearer {bearer_token}"
        if basic_auth:
            self._session.auth = basic_auth

    def __repr__(self) -> str:  # never shows credentials
        return f"PrometheusClient(url={self.url!r})"

    def close(self) -> None:
        self._session.close()

    # --- HTTP -----------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, str]) -> Any:
        what = f"{path.rsplit('/', 1)[-1]} {_short(params.get('query', ''), 80)!r}"
        try:
            resp = self._session.post(f"{self.url}{path}", data=params, timeout=self.timeout)
        except requests.exceptions.SSLError as exc:
            raise ExternalPermanentError(
                f"prometheus {what}: TLS error talking to {self.url} ({_short(str(exc), 120)})",
                system=SYSTEM,
            ) from None
        except requests.exceptions.Timeout:
            raise ExternalTemporaryError(
                f"prometheus {what}: {self.url} timed out after {self.timeout:g}s",
                system=SYSTEM,
                retry_after=5.0,
            ) from None
        except requests.exceptions.RequestException:
            raise ExternalTemporaryError(
                f"prometheus {what}: {self.url} unreachable", system=SYSTEM, retry_after=5.0
            ) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        error = ""
        if isinstance(body, dict) and body.get("status") == "error":
            error = f"{body.get('errorType', 'error')}: {body.get('error', '')}"
        status = resp.status_code
        if status >= 500 or status == 429:
            retry = resp.headers.get("Retry-After", "")
            raise ExternalTemporaryError(
                f"prometheus {what}: HTTP {status} {_short(error or resp.text, 200)}",
                system=SYSTEM,
                status=status,
                retry_after=float(retry) if retry.isdigit() else 5.0,
            )
        if status >= 400 or error or not isinstance(body, dict):
            raise ExternalPermanentError(
                f"prometheus {what}: {_short(error or f'HTTP {status} {resp.text}')}",
                system=SYSTEM,
                status=status,
            )
        return body.get("data", {})

    # --- queries --------------------------------------------------------------------------

    def query_range(
        self, expr: str, *, start: datetime, end: datetime, step_s: float
    ) -> DemandSeries:
        """Values of a single-series ``expr`` on the grid start..end (inclusive) every step."""
        if step_s <= 0:
            raise UsageError(f"prometheus step {step_s:g}s: must be positive")
        t0, t1 = _ts(start), _ts(end)
        if t1 < t0:
            raise UsageError("prometheus query range: end is before start")
        n = math.floor((t1 - t0) / step_s + 1e-9) + 1
        values = np.full(n, np.nan)
        for first in range(0, n, self.max_points):
            last = min(n, first + self.max_points) - 1
            data = self._api(
                "/api/v1/query_range",
                {
                    "query": expr,
                    "start": repr(t0 + first * step_s),
                    "end": repr(t0 + last * step_s),
                    "step": repr(float(step_s)),
                },
            )
            result = data.get("result", []) if isinstance(data, dict) else []
            if len(result) > 1:
                raise ExternalPermanentError(
                    f"prometheus query {_short(expr, 80)!r} returned {len(result)} series; "
                    "aggregate it to one (e.g. sum(...))",
                    system=SYSTEM,
                )
            for ts, text in result[0].get("values", []) if result else []:
                i = round((float(ts) - t0) / step_s)
                if 0 <= i < n:
                    values[i] = float(text)
        return DemandSeries(
            start=datetime.fromtimestamp(t0, UTC), step_s=float(step_s), values=values
        )

    def query(self, expr: str, *, at: datetime | None = None) -> float | None:
        """Instant query: a scalar or a one-element vector as float; None when empty."""
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(_ts(at))
        data = self._api("/api/v1/query", params)
        rtype = data.get("resultType")
        result = data.get("result")
        if rtype in ("scalar", "string") and isinstance(result, list) and len(result) == 2:
            return float(result[1])
        if rtype == "vector" and isinstance(result, list):
            if not result:
                return None
            if len(result) == 1:
                return float(result[0]["value"][1])
            raise ExternalPermanentError(
                f"prometheus query {_short(expr, 80)!r} returned {len(result)} series; "
                "an SLI gate needs exactly one",
                system=SYSTEM,
            )
        raise ExternalPermanentError(
            f"prometheus query {_short(expr, 80)!r}: expected a scalar or vector, got {rtype}",
            system=SYSTEM,
        )


class PrometheusDemandSource:
    """``DemandSource`` from a PromQL expression giving requests per minute.

    ``stamp`` says what a sample's timestamp means: ``"end"`` (default) for expressions like
    ``sum(rate(http_requests_total[1m])) * 60`` whose value at T covers the step ending at T;
    ``"start"`` for gauges stamped at the start of their step (the test harness' traces)."""

    def __init__(
        self,
        *,
        client: PrometheusClient,
        query: str,
        stamp: Literal["end", "start"] = "end",
    ) -> None:
        if not query.strip():
            raise UsageError("prometheus demand query must not be empty")
        if stamp not in ("end", "start"):
            raise UsageError(f"prometheus demand stamp {stamp!r}: use 'end' or 'start'")
        self.client = client
        self.query = query
        self.stamp = stamp

    def __repr__(self) -> str:
        return f"PrometheusDemandSource(query={self.query!r}, stamp={self.stamp!r})"

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        """The ``lookback_s // step_s`` steps ending at ``end``: the last covers
        ``[end - step, end)``."""
        if step_s <= 0 or lookback_s < step_s:
            raise InputError(
                f"demand history: lookback {lookback_s:g}s must cover at least one step "
                f"of {step_s:g}s"
            )
        n = int(lookback_s // step_s)
        first_start = utc(end) - timedelta(seconds=n * step_s)
        shift = timedelta(seconds=step_s if self.stamp == "end" else 0.0)
        got = self.client.query_range(
            self.query,
            start=first_start + shift,
            end=first_start + shift + timedelta(seconds=(n - 1) * step_s),
            step_s=step_s,
        )
        log.debug(
            "demand history: %s steps of %ss, %s missing", n, step_s, np.isnan(got.values).sum()
        )
        return DemandSeries(start=first_start, step_s=float(step_s), values=got.values[:n])
