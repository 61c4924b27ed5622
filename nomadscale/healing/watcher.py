"""The maintenance watcher (runs on every GPU node as a Nomad system job).

It long-polls the metadata server's ``instance/maintenance-event`` (keeping the ETag, so the
60 s live-migration notice is always armed), survives metadata server errors with backoff on
an injected clock, and on a change POSTs ``{node, event, deadline}`` to nomadscale's
``/maintenance/report`` with the report token (bearer): a notice, and ``NONE`` when it ends.
While nomadscale is unreachable it keeps following the metadata server and reports the latest
state once it can (see ``run``).
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
        return self._observe(value)

    def read_once(self) -> str | None:
        """The current value at once (while a report waits for its retry): a hanging GET with
        ``last_etag=0`` returns without waiting. The new value when it changed, else None."""
        got = self.metadata.wait_maintenance_event("0")
        if got is None:
            return None
        value, self.etag = got
        return self._observe(value)

    def _observe(self, value: str) -> str | None:
        if value == self.value:
            return None
        log.info("maintenance-event changed: %s -> %s", self.value, value)
        self.value = value
        return value

    def _body(self, event: str) -> dict[str, Any]:
        """The report of ``event``, its deadline counted from now (when it was seen)."""
        body: dict[str, Any] = {"node": self.node, "event": event, "deadline": None}
        if event in NOTICE_S:
            body["deadline"] = (self.clock.now() + timedelta(seconds=NOTICE_S[event])).isoformat()
        return body

    def send(self, body: dict[str, Any]) -> str | None:
        """One POST of ``body``: None once reported, else why not (retry later).
        ``PermanentError`` when nomadscale refuses it."""
        try:
            r = self._http.post(
                self.report_url,
                json=body,
                headers={"Authorization": f"Bearer {self.token.reveal()}"},
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if r.status_code < 300:
            self.reports.append(body)
            log.info("maintenance reported: %s on %s", body["event"], self.node)
            return None
        if r.status_code < 500 and r.status_code != 429:
            raise PermanentError(f"report refused by {self.report_url}: HTTP {r.status_code}")
        return f"HTTP {r.status_code}"

    def run(self, *, max_polls: int | None = None) -> None:
        """Watch until ``stop()`` (or ``max_polls`` metadata reads, for tests).

        A change is reported at once. While nomadscale cannot take a report, the watcher keeps
        reading the metadata server between retries (bounded backoff) and the report waiting
        is replaced by the latest state: a notice that ended meanwhile is reported as its end
        (``NONE``), never late as if it were still coming."""
        delay = self.backoff_initial_s  # metadata server errors
        retry = self.backoff_initial_s  # report retries
        pending: dict[str, Any] | None = None
        polls = 0
        while not self._stop.is_set() and (max_polls is None or polls < max_polls):
            polls += 1
            try:
                changed = self.poll_once() if pending is None else self.read_once()
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
            if self._stop.is_set():
                break  # stopped while the GET hung: what it saw is for the next watcher
            if changed is not None:
                if pending is not None:
                    log.warning("maintenance-event %s not reported: it is %s now",
                                pending["event"], changed)  # fmt: skip
                pending = self._body(changed)
            if pending is None:
                continue
            try:
                why = self.send(pending)
            except PermanentError as exc:
                log.error("%s", exc)
                why = None
            if why is None:
                pending, retry = None, self.backoff_initial_s
                continue
            log.warning("maintenance report failed (%s); retrying in %.0fs", why, retry)
            self.clock.sleep(retry)
            retry = min(self.backoff_max_s, retry * 2)
