"""Prometheus HTTP API client (requests): demand history and SLI gates.

* ``PrometheusClient.query_range(expr, start=, end=, step_s=)`` -> ``DemandSeries`` on the
  fixed grid ``start, start+step, ..., <= end`` (NaN where Prometheus has no sample). Ranges
  longer than ``max_points`` steps are split into several requests (Prometheus refuses more
  than 11,000 points per series).
* ``PrometheusClient.query(expr, at=None)`` -> float | None: an instant scalar or
  one-element vector; None when the result is empty. Several series -> ExternalPermanentError.
* ``PrometheusDemandSource(client=, query=, stamp="end", where="demand.query")`` ->
  ``core.ports.DemandSource``: the history on the step grid (whole multiples of the step since
  the epoch, so a cycle fired a few ms after its slot reads exactly what ``plan`` reads at the
  slot); NaN, +-Inf and negative samples are gaps (logged), never a failed cycle; a query
  Prometheus refuses, or whose result is not one series, is a ``ConfigError`` naming ``where``
  (the policy file and field when the caller gives them).

Errors: connection, timeout, 5xx, 429, 503 -> ExternalTemporaryError(system="prometheus");
400/422 (bad query) -> ExternalPermanentError with Prometheus' own error text; 401/403 ->
ExternalPermanentError; a 200 whose result is not what the query type gives (a range query
answered with a vector or a string, e.g. by a proxy) -> ExternalPermanentError(status=200).
Credentials (``https://user:password@host``, a bearer token) are sent, never shown: messages
and ``repr`` name the URL without them.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import requests

from nomadscale.core.clock import utc
from nomadscale.core.errors import (
    ConfigError,
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


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``scheme://user:password@host/path`` -> (the URL without them, (user, password))."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise UsageError("prometheus url: not a valid URL") from None
    if "@" not in parts.netloc or not host:
        return url, None
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return bare, (unquote(parts.username or ""), unquote(parts.password or ""))


#: Status of the permanent errors a query itself causes (refused, or an unusable result),
#: as opposed to credentials, TLS or a wrong URL.
QUERY_FAULTS = (200, 400, 422)
_HINTS = {
    401: " (check the credentials in PROMETHEUS_URL)",
    403: " (check the credentials in PROMETHEUS_URL)",
    404: " (is PROMETHEUS_URL the Prometheus server, with its path prefix if any?)",
}


def _unusable(expr: str, what: str) -> ExternalPermanentError:
    return ExternalPermanentError(
        f"prometheus query {_short(expr, 80)!r} {what}", system=SYSTEM, status=200
    )


def _matrix_values(data: Any, expr: str) -> list[tuple[float, float]]:
    """The ``(timestamp, value)`` pairs of a range query's one series ([] for none).

    Prometheus answers a range query with a matrix; anything else (a vector or a string from a
    proxy or a non-Prometheus API, a malformed body) is one permanent error naming the query,
    never a traceback or a silent "no data". Several series: aggregate them in the query."""
    rtype = data.get("resultType") if isinstance(data, dict) else None
    result = data.get("result") if isinstance(data, dict) else None
    if rtype != "matrix" or not isinstance(result, list):
        return_type = rtype if isinstance(rtype, str) else "no result type"
        raise _unusable(expr, f"returned a {return_type}, not the matrix a range query gives")
    if len(result) > 1:
        raise _unusable(expr, f"returned {len(result)} series; aggregate it to one (e.g. sum(...))")
    if not result:
        return []
    series = result[0]
    raw = series.get("values", []) if isinstance(series, dict) else None
    if not isinstance(raw, list):
        raise _unusable(expr, "returned a series without a list of values")
    out = []
    for pair in raw:
        try:
            ts, text = pair
            out.append((float(ts), float(text)))  # "NaN", "+Inf", "-Inf" parse too
        except (TypeError, ValueError):
            raise _unusable(
                expr, f"returned a sample that is not [time, value]: {pair!r:.60}"
            ) from None
    return out


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
        base, in_url = _split_credentials(url.strip().rstrip("/"))
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"prometheus url {base!r}: use http://host:port or https://host:port")
        if in_url and not basic_auth and not bearer_token:
            basic_auth = in_url  # what requests would do, but kept out of every message
        if bearer_token and basic_auth:
            raise UsageError("prometheus: give a bearer token or basic auth, not both")
        if not 1 <= max_points <= 11_000:
            raise UsageError(f"prometheus max_points {max_points}: must be 1..11000")
        self.url = base
        self.timeout = float(timeout)
        self.max_points = max_points
        self._session = requests.Session()
        # given with every request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (set on
        # many hosts) override a Session's own ``verify``, so a CA file or False was ignored
        self._verify = verify
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
        # Prometheus abandons the evaluation when the client gives up (its own default: 2m)
        params = {**params, "timeout": repr(self.timeout)}
        try:
            resp = self._session.post(
                f"{self.url}{path}", data=params, timeout=self.timeout, verify=self._verify
            )
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
        if status >= 400 or error:
            hint = _HINTS.get(status, "") if not error else ""
            raise ExternalPermanentError(
                f"prometheus {what}: {_short(error or f'HTTP {status} {resp.text}')}{hint}",
                system=SYSTEM,
                status=status,
            )
        if not isinstance(body, dict):  # a login page, a proxy's error page, another API
            raise ExternalPermanentError(
                f"prometheus {what}: {self.url} did not answer as the Prometheus HTTP API "
                f"(HTTP {status} {_short(resp.text, 120)})",
                system=SYSTEM,
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
            for ts, text in _matrix_values(data, expr):
                i = round((ts - t0) / step_s)
                if 0 <= i < n:
                    values[i] = text
        return DemandSeries(
            start=datetime.fromtimestamp(t0, UTC), step_s=float(step_s), values=values
        )

    def query(self, expr: str, *, at: datetime | None = None) -> float | None:
        """Instant query: a scalar or a one-element vector as float; None when empty."""
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(_ts(at))
        data = self._api("/api/v1/query", params)
        rtype = data.get("resultType") if isinstance(data, dict) else None
        result = data.get("result") if isinstance(data, dict) else None
        try:
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
        except (TypeError, ValueError, KeyError, IndexError):
            raise _unusable(
                expr, f"returned a {rtype} that is not a number: {result!r:.80}"
            ) from None
        raise ExternalPermanentError(
            f"prometheus query {_short(expr, 80)!r}: expected a scalar or vector, got {rtype}",
            system=SYSTEM,
        )


class PrometheusDemandSource:
    """``DemandSource`` from a PromQL expression giving requests per minute.

    ``stamp`` says what a sample's timestamp means: ``"end"`` (default) for expressions like
    ``sum(rate(http_requests_total[1m])) * 60`` whose value at T covers the step ending at T;
    ``"start"`` for gauges stamped at the start of their step (the test harness' traces).
    ``where`` names the query in errors: ``"policies/ekyc-ml.yaml: demand.query"``."""

    def __init__(
        self,
        *,
        client: PrometheusClient,
        query: str,
        stamp: Literal["end", "start"] = "end",
        where: str = "demand.query",
    ) -> None:
        if not query.strip():
            raise UsageError("prometheus demand query must not be empty")
        if stamp not in ("end", "start"):
            raise UsageError(f"prometheus demand stamp {stamp!r}: use 'end' or 'start'")
        self.client = client
        self.query = query
        self.stamp = stamp
        self.where = where

    def __repr__(self) -> str:
        return f"PrometheusDemandSource(query={self.query!r}, stamp={self.stamp!r})"

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        """The ``lookback_s // step_s`` steps of the step grid (whole steps since the epoch)
        that ended at or before ``end``: the last covers ``[E - step, E)`` with ``E`` = ``end``
        floored to the grid. The grid keeps the steps on the cycle boundaries whenever ``end``
        is read (a scheduler's jitter, an "apply now" between slots) and it is what a
        step-aligning query front end (Thanos, Mimir) answers."""
        if step_s <= 0 or lookback_s < step_s:
            raise InputError(
                f"demand history: lookback {lookback_s:g}s must cover at least one step "
                f"of {step_s:g}s"
            )
        n = int(lookback_s // step_s)
        last_end = math.floor(_ts(end) / step_s + 1e-9) * step_s
        first_start = datetime.fromtimestamp(last_end - n * step_s, UTC)
        shift = timedelta(seconds=step_s if self.stamp == "end" else 0.0)
        try:
            got = self.client.query_range(
                self.query,
                start=first_start + shift,
                end=first_start + shift + timedelta(seconds=(n - 1) * step_s),
                step_s=step_s,
            )
        except ExternalPermanentError as e:
            if e.status in QUERY_FAULTS:  # the query's own fault: the operator fixes the policy
                raise ConfigError(f"{self.where}: {e}") from None
            raise
        values = np.array(got.values[:n], dtype=float)
        self._drop_invalid(values, first_start, step_s)
        missing = int(np.isnan(values).sum())
        if n and missing == n:
            log.warning(
                "%s: no demand data from %s to %s (a scrape gap, or %s matches no series)",
                self.where, first_start.isoformat(),
                datetime.fromtimestamp(last_end, UTC).isoformat(), _short(self.query, 80),
            )  # fmt: skip
        log.debug("demand history: %s steps of %ss, %s missing", n, step_s, missing)
        return DemandSeries(start=first_start, step_s=float(step_s), values=values)

    def _drop_invalid(self, values: np.ndarray, start: datetime, step_s: float) -> None:
        """+-Inf (a division by zero in the query) and negative samples are no demand: they
        become gaps, so one bad sample does not fail every cycle for a whole lookback."""
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(np.isinf(values) | (values < 0))
        if len(bad):
            first = start + timedelta(seconds=float(bad[0]) * step_s)
            log.warning(
                "%s: %d samples are infinite or negative (the first, %s, at %s); read as gaps",
                self.where, len(bad), f"{values[bad[0]]:g}", first.isoformat(),
            )  # fmt: skip
            values[bad] = np.nan
