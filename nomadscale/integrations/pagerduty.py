"""PagerDuty adapters on the official ``pagerduty`` package (7.x, httpx2 underneath).

* ``PagerDutyAlerts``: ``core.ports.AlertPort`` on ``EventsApiV2Client`` (trigger/resolve by
  dedup key, custom details).
* ``PagerDutyIncidents``: notes and resolution of incidents on ``RestApiV2Client``.

The package's own retry loops sleep with ``time.sleep``; they are switched off here (callers
retry with their own ``Clock``). Errors are translated: 4xx -> ``ExternalPermanentError``,
429/5xx/network -> ``ExternalTemporaryError``. Keys are ``Secret`` values and never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
import pagerduty

from nomadscale.config.settings import Secret
from nomadscale.core.errors import (
    ExternalPermanentError,
    ExternalTemporaryError,
    NotFoundError,
    PermanentError,
)

log = logging.getLogger(__name__)

SYSTEM = "pagerduty"
_SEVERITIES = ("critical", "error", "warning", "info")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
T = TypeVar("T")


def _set_base_url(client: pagerduty.ApiClient, base_url: str | None) -> None:
    """Point ``client`` at ``base_url``.

    The package's ``url`` setter rejects anything but ``https://``. A plain-HTTP URL is only
    accepted for a loopback host (local test servers, a local relay); it is assigned to the
    private ``_url`` attribute, the one place that relies on the package's internals
    (verified with pagerduty 7.2.0, see /work/shared/reference/pagerduty.md).
    """
    if base_url is None:
        return
    parts = urlsplit(base_url)
    if parts.scheme == "https":
        client.url = base_url.rstrip("/")
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        client._url = base_url.rstrip("/")  # private: the setter is https-only
        return
    raise PermanentError(
        f"pagerduty base_url: must be https:// (or http:// on loopback): {base_url}"
    )


def _quiet_retries(client: pagerduty.ApiClient, timeout_s: float) -> None:
    # 429 is otherwise retried forever with time.sleep; allow one immediate retry, then report.
    client.retry = {429: 1}
    client.sleep_timer = 0.0
    client.max_network_attempts = 0
    client.max_http_attempts = 2
    client.timeout = timeout_s  # type: ignore[assignment]  # int in the stubs, float ok


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None) if resp is not None else None


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run one client call, translating the package's errors into ``core.errors``."""
    try:
        return fn()
    except pagerduty.Error as exc:
        status = _status(exc)
        if status is None or status == 429 or status >= 500:
            cause = f"HTTP {status}" if status else type(exc.__cause__ or exc).__name__
            raise ExternalTemporaryError(
                f"pagerduty: {what}: {cause}", system=SYSTEM, status=status, retry_after=5.0
            ) from None
        if status == 404:
            raise NotFoundError(
                f"pagerduty: {what}: not found", system=SYSTEM, status=404
            ) from None
        raise ExternalPermanentError(
            f"pagerduty: {what}: refused with HTTP {status}", system=SYSTEM, status=status
        ) from None
    except (httpx2.HTTPError, OSError) as exc:
        raise ExternalTemporaryError(
            f"pagerduty: {what}: {type(exc).__name__}", system=SYSTEM, retry_after=5.0
        ) from None


class PagerDutyAlerts:
    """AlertPort on the Events API v2. ``client_kwargs`` go to ``httpx2.Client`` (e.g.
    ``transport=``)."""

    def __init__(
        self,
        routing_key: Secret,
        *,
        base_url: str | None = None,
        source: str = "nomadscale",
        timeout_s: float = 10.0,
        **client_kwargs: Any,
    ) -> None:
        if not routing_key:
            raise PermanentError("pagerduty routing key: empty")
        self._client = pagerduty.EventsApiV2Client(routing_key.reveal(), **client_kwargs)
        _set_base_url(self._client, base_url)
        _quiet_retries(self._client, timeout_s)
        self._source = source

    def trigger(
        self, *, dedup_key: str, summary: str, severity: str, details: Mapping[str, Any]
    ) -> None:
        if severity not in _SEVERITIES:
            raise PermanentError(f"alert severity: {severity!r} is not one of {_SEVERITIES}")
        payload = {
            "summary": summary[:1024],
            "source": self._source,
            "severity": severity,
            "timestamp": datetime.now(UTC).isoformat(),
            "custom_details": dict(details),
        }
        _call(
            "trigger alert",
            lambda: self._client.send_event("trigger", dedup_key=dedup_key[:255], payload=payload),
        )
        log.info("pagerduty alert triggered dedup_key=%s severity=%s", dedup_key, severity)

    def resolve(self, *, dedup_key: str) -> None:
        _call("resolve alert", lambda: self._client.resolve(dedup_key[:255]))
        log.info("pagerduty alert resolved dedup_key=%s", dedup_key)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"PagerDutyAlerts(url={self._client.url!r})"


class PagerDutyIncidents:
    """Notes on and resolution of incidents through the REST API v2."""

    def __init__(
        self,
        api_key: Secret,
        *,
        from_email: str,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        **client_kwargs: Any,
    ) -> None:
        if not api_key:
            raise PermanentError("pagerduty api key: empty")
        if not from_email or "@" not in from_email:
            raise PermanentError(f"pagerduty from: not an email address: {from_email!r}")
        self._client = pagerduty.RestApiV2Client(
            api_key.reveal(), default_from=from_email, **client_kwargs
        )
        _set_base_url(self._client, base_url)
        _quiet_retries(self._client, timeout_s)

    def add_note(self, incident_id: str, text: str) -> str:
        """Add a note (truncated to 25,000 characters); returns the note id."""
        note = _call(
            f"add note to incident {incident_id}",
            lambda: self._client.rpost(
                f"/incidents/{incident_id}/notes", json={"content": text[:25000]}
            ),
        )
        log.info("pagerduty note added incident=%s", incident_id)
        return str(note.get("id", "")) if isinstance(note, dict) else ""

    def resolve(self, incident_id: str) -> None:
        _call(
            f"resolve incident {incident_id}",
            lambda: self._client.rput(
                f"/incidents/{incident_id}",
                json={"type": "incident_reference", "status": "resolved"},
            ),
        )
        log.info("pagerduty incident resolved incident=%s", incident_id)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"PagerDutyIncidents(url={self._client.url!r})"
