"""The maintenance watcher (runs on every GPU node as a Nomad system job).

It long-polls the metadata server's ``instance/maintenance-event`` (keeping the ETag, so the
60 s live-migration notice is always armed), survives metadata server errors with backoff on
an injected clock, and on a notice POSTs ``{node, event, deadline}`` to nomadscale's
``/maintenance/report`` with the report token (bearer).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import httpx

from nomadscale.config.settings import Secret
from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import ExternalTemporaryError, NomadscaleError, PermanentError
from nomadscale.integrations.gce_metadata import MetadataClient

log = logging.getLogger(__name__)
NOTICE_S = {"TERMINATE_ON_HOST_MAINTENANCE": 3600.0, "MIGRATE_ON_HOST_MAINTENANCE": 60.0}


class MaintenanceWatcher:
    def __init__(
        self,
        *,
        metadata: MetadataClient,
        report_url: str,
        token: Secret,
        node: str,
        clock: Clock | None = None,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        report_timeout_s: float = 10.0,
    ) -> None:
        self.metadata = metadata
        self.report_url = report_url
        self.token = token
        self.node = node
        self.clock: Clock = clock or SystemClock()
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.etag = "0"
        self.value = "NONE"
        self.reports: list[dict[str, Any]] = []
        self._http = httpx.Client(timeout=report_timeout_s, trust_env=False)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._http.close()
        self.metadata.close()

    def poll_once(self) -> str | None:
        """One hanging GET; returns the new value when it changed, else None."""
        got = self.metadata.wait_maintenance_event(self.etag)
        if got is None:
            return None
        value, self.etag = got
        if value == self.value:
            return None
        log.info("maintenance-event changed: %s -> %s", self.value, value)
        self.value = value
        return value

    def report(self, event: str) -> None:
        now = self.clock.now()
        body: dict[str, Any] = {"node": self.node, "event": event, "deadline": None}
        if event in NOTICE_S:
            body["deadline"] = (now + timedelta(seconds=NOTICE_S[event])).isoformat()
        delay = self.backoff_initial_s
        while not self._stop.is_set():
            try:
                r = self._http.post(
                    self.report_url,
                    json=body,
                    headers={"Authorization": f"Bearer {self.token.reveal()}"},
                )
                if r.status_code < 300:
                    self.reports.append(body)
                    log.info("maintenance reported: %s on %s", event, self.node)
                    return
                if r.status_code < 500 and r.status_code != 429:
                    raise PermanentError(
                        f"report refused by {self.report_url}: HTTP {r.status_code}"
                    )
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            log.warning("maintenance report failed (%s); retrying in %.0fs", why, delay)
            self.clock.sleep(delay)
            delay = min(self.backoff_max_s, delay * 2)

    def run(self, *, max_polls: int | None = None) -> None:
        """Watch until ``stop()`` (or ``max_polls`` hanging GETs, for tests)."""
        delay = self.backoff_initial_s
        polls = 0
        while not self._stop.is_set() and (max_polls is None or polls < max_polls):
            polls += 1
            try:
                changed = self.poll_once()
                delay = self.backoff_initial_s
            except ExternalTemporaryError as exc:
                log.warning("metadata server: %s; retrying in %.0fs", exc, delay)
                self.clock.sleep(delay)
                delay = min(self.backoff_max_s, delay * 2)
                continue
            except NomadscaleError as exc:
                log.error("metadata server: %s; retrying in %.0fs", exc, self.backoff_max_s)
                self.clock.sleep(self.backoff_max_s)
                continue
            if changed is not None:
                try:
                    self.report(changed)
                except PermanentError as exc:
                    log.error("%s", exc)
