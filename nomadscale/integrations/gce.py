"""Compute Engine zonal managed instance groups as a ``NodePoolPort``.

REST calls (``base_url`` = ``settings.gce_api_url``, e.g. ``https://compute.googleapis.com/compute/v1``):

* ``GET  projects/P/zones/Z/instanceGroupManagers/NAME``               -> ``targetSize``
* ``POST projects/P/zones/Z/instanceGroupManagers/NAME/resize?size=N`` -> zone operation
* ``POST projects/P/zones/Z/instanceGroupManagers/NAME/listManagedInstances``
* ``POST projects/P/zones/Z/instanceGroupManagers/NAME/deleteInstances {"instances": [...]}``
* ``GET  projects/P/zones/Z/operations/OP`` (polled until ``DONE``, with the injected clock)

``fulfilment`` tells how much of a MIG's target size the cloud could not create: a resize
operation is ``DONE`` once the creations are *scheduled* (instanceGroupManagers.resize, REST
v1 reference), and an instance the zone cannot create (stockout
``ZONE_RESOURCE_POOL_EXHAUSTED``, ``QUOTA_EXCEEDED``) stays ``currentAction: CREATING`` with
the reason in ``lastAttempt.errors.errors[]`` while the MIG retries it (ManagedInstance
reference: "If the group fails to create this instance, it will try again until it is
successful"). The MIG's ``currentActions.creating`` and ``status.isStable`` say the same in
summary.

Rate limits and server errors: a 429 (the request was not processed) is retried for every
call, a 5xx only for the idempotent ones (reads, ``resize`` to an absolute size, operation
polls; never ``deleteInstances``), at most ``retries`` attempts in all, each wait the reply's
``Retry-After`` (seconds or an HTTP date) capped at ``max_retry_wait_s``, on the clock.

Credentials come from ``google.auth.default()`` unless given; tests and the simulator pass
``AnonymousCredentials`` against a loopback base URL (``nomadscale.sim.compute``). A token
endpoint that refuses the credentials (google-auth's ``RefreshError``: a disabled or deleted
key) is an ``ExternalPermanentError`` (temporary when google-auth says it is retryable), an
unreachable one an ``ExternalTemporaryError``: one ``gce: ...`` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from google.auth import exceptions as auth_errors

from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import (
    ConflictError,
    ExternalPermanentError,
    ExternalTemporaryError,
    NotFoundError,
)
from nomadscale.core.ports import Instance

log = logging.getLogger(__name__)

SYSTEM = "gce"


def _parse_time(raw: Any) -> datetime | None:
    if not raw or not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None


def retry_after_s(raw: str | None, *, now: datetime, default: float = 5.0) -> float:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date (RFC 9110 10.2.3);
    ``default`` when absent or unreadable, never negative."""
    if not raw or not raw.strip():
        return default
    text = raw.strip()
    with contextlib.suppress(ValueError):  # not delta-seconds: an HTTP date
        return max(0.0, float(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _first_error(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            if err.get("message"):
                return str(err["message"])
            errs = err.get("errors") or []
            if errs and isinstance(errs[0], dict):
                return str(errs[0].get("message", ""))
    return ""


@dataclass(frozen=True, slots=True)
class Fulfilment:
    """How much of a MIG's target size exists: ``not_created`` instances the cloud failed to
    create (its last attempt has errors), with their error codes, most frequent first."""

    zone: str
    group: str
    target: int
    not_created: int = 0
    creating: int = 0  # every instance being created, failing or not
    stable: bool | None = None
    errors: tuple[tuple[str, int], ...] = ()  # (code, instances)
    detail: str = ""  # the first error's message

    @property
    def short(self) -> bool:
        return self.not_created > 0

    def line(self) -> str:
        """``zone-b: 2 of 4 instances not created: ZONE_RESOURCE_POOL_EXHAUSTED (2)``."""
        codes = ", ".join(f"{c} ({n})" for c, n in self.errors) or "no error given"
        out = f"{self.zone}: {self.not_created} of {self.target} instances not created: {codes}"
        return out + (f": {self.detail[:160]}" if self.detail else "")


def _last_errors(mi: dict[str, Any]) -> list[dict[str, Any]]:
    last = mi.get("lastAttempt")
    errs = (last.get("errors") or {}) if isinstance(last, dict) else {}
    got = errs.get("errors") if isinstance(errs, dict) else None
    return [e for e in got or [] if isinstance(e, dict)]


class GceMigPool:
    """``NodePoolPort`` over zonal managed instance groups of one project."""

    def __init__(
        self,
        *,
        project: str,
        credentials: Any = None,
        base_url: str = "https://compute.googleapis.com/compute/v1",
        session: requests.Session | None = None,
        clock: Clock | None = None,
        timeout_s: float = 30.0,
        operation_timeout_s: float = 300.0,
        poll_s: float = 2.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
    ) -> None:
        self.project = project
        self.base_url = base_url.rstrip("/")
        self._clock = clock or SystemClock()
        self._timeout = timeout_s
        self._op_timeout = operation_timeout_s
        self._poll = poll_s
        self._retries = max(1, retries)
        self._max_wait = max_retry_wait_s
        if session is None:
            from google.auth.transport.requests import AuthorizedSession

            if credentials is None:
                import google.auth

                try:
                    credentials, _ = google.auth.default(
                        scopes=["https://www.googleapis.com/auth/compute"]
                    )
                except google.auth.exceptions.DefaultCredentialsError as e:
                    raise ExternalPermanentError(
                        f"gce: no Google credentials found: {e}", system=SYSTEM
                    ) from None
            session = AuthorizedSession(credentials)
        self._session = session

    def __repr__(self) -> str:
        return f"GceMigPool(project={self.project!r}, base_url={self.base_url!r})"

    # --- HTTP ------------------------------------------------------------------------------

    def _zone_url(self, zone: str) -> str:
        return f"{self.base_url}/projects/{self.project}/zones/{zone}"

    def _mig_url(self, group: str, zone: str) -> str:
        return f"{self._zone_url(zone)}/instanceGroupManagers/{group}"

    def _call(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        what: str,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """One REST call, retried (bounded) on 429 and, when ``idempotent``, on 5xx and
        connection errors; see the module docstring."""
        attempt = 1
        while True:
            try:
                return self._call_once(method, url, params=params, body=body, what=what)
            except ExternalTemporaryError as e:
                again = e.status == 429 or idempotent
                if not again or attempt >= self._retries:
                    raise
                wait = min(self._max_wait, e.retry_after)
                log.warning("%s (attempt %s of %s): retrying in %.0fs", e, attempt,
                            self._retries, wait)  # fmt: skip
                self._clock.sleep(wait)
                attempt += 1

    def _call_once(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None,
        body: Any,
        what: str,
    ) -> dict[str, Any]:
        try:
            resp = self._session.request(
                method, url, params=params, json=body, timeout=self._timeout
            )
        except requests.RequestException as e:
            raise ExternalTemporaryError(
                f"gce: {what}: {type(e).__name__}", system=SYSTEM
            ) from None
        except auth_errors.TransportError as e:  # the token endpoint is unreachable
            raise ExternalTemporaryError(
                f"gce: {what}: getting a Google access token failed: {type(e).__name__}",
                system=SYSTEM,
            ) from None
        except auth_errors.RefreshError as e:  # the token endpoint refused the credentials
            detail = str(e.args[0] if e.args else e)[:200]
            msg = f"gce: {what}: Google credentials refused: {detail}"
            if getattr(e, "retryable", False):
                raise ExternalTemporaryError(msg, system=SYSTEM) from None
            raise ExternalPermanentError(msg, system=SYSTEM) from None
        except auth_errors.GoogleAuthError as e:
            raise ExternalPermanentError(
                f"gce: {what}: Google credentials unusable: {type(e).__name__}", system=SYSTEM
            ) from None
        if resp.status_code >= 400:
            try:
                detail = _first_error(resp.json())
            except ValueError:
                detail = resp.text.strip()[:200]
            msg = f"gce: {what}: HTTP {resp.status_code}" + (f": {detail}" if detail else "")
            code = resp.status_code
            if code == 404:
                raise NotFoundError(msg, system=SYSTEM, status=code)
            if code in (409, 412):
                raise ConflictError(msg, system=SYSTEM, status=code)
            if code == 429 or code >= 500:
                retry = retry_after_s(resp.headers.get("Retry-After"), now=self._clock.now())
                raise ExternalTemporaryError(msg, system=SYSTEM, status=code, retry_after=retry)
            raise ExternalPermanentError(msg, system=SYSTEM, status=code)
        if not resp.content:
            return {}
        try:
            out = resp.json()
        except ValueError:
            raise ExternalTemporaryError(f"gce: {what}: reply is not JSON", system=SYSTEM) from None
        return out if isinstance(out, dict) else {}

    def _wait(self, op: dict[str, Any], *, zone: str, what: str) -> None:
        """Poll a zone operation until DONE (bounded); raise when it ended in error."""
        name = op.get("name")
        started = self._clock.monotonic()
        while op.get("status") != "DONE" and name:
            if self._clock.monotonic() - started > self._op_timeout:
                raise ExternalTemporaryError(
                    f"gce: {what}: operation {name} not done after {self._op_timeout:.0f}s",
                    system=SYSTEM,
                )
            self._clock.sleep(self._poll)
            op = self._call("GET", f"{self._zone_url(zone)}/operations/{name}", what=what)
        detail = _first_error(op)
        if detail:
            raise ExternalPermanentError(f"gce: {what}: {detail}", system=SYSTEM)

    # --- NodePoolPort -------------------------------------------------------------------------

    def size(self, group: str, *, zone: str) -> int:
        body = self._call("GET", self._mig_url(group, zone), what=f"get {zone}/{group}")
        try:
            return int(body["targetSize"])
        except (KeyError, TypeError, ValueError):
            raise ExternalPermanentError(
                f"gce: get {zone}/{group}: reply has no targetSize", system=SYSTEM
            ) from None

    def resize(self, group: str, size: int, *, zone: str) -> None:
        if size < 0:
            raise ExternalPermanentError(
                f"gce: resize {zone}/{group}: size must not be negative, got {size}",
                system=SYSTEM,
            )
        what = f"resize {zone}/{group} to {size}"
        op = self._call(
            "POST", self._mig_url(group, zone) + "/resize", params={"size": size}, what=what
        )
        self._wait(op, zone=zone, what=what)
        log.info("gce: resized %s/%s to %s", zone, group, size)

    def _managed(self, group: str, *, zone: str) -> list[dict[str, Any]]:
        """Every managedInstances[] entry of the MIG (all pages)."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params = {"pageToken": token} if token else None
            body = self._call(
                "POST",
                self._mig_url(group, zone) + "/listManagedInstances",
                params=params,
                what=f"list instances of {zone}/{group}",
            )
            out.extend(mi for mi in body.get("managedInstances") or [] if isinstance(mi, dict))
            token = body.get("nextPageToken")
            if not token:
                return out

    def fulfilment(self, group: str, *, zone: str) -> Fulfilment:
        """The MIG's target size against what the cloud could create (module docstring)."""
        mig = self._call("GET", self._mig_url(group, zone), what=f"get {zone}/{group}")
        try:
            target = int(mig["targetSize"])
        except (KeyError, TypeError, ValueError):
            raise ExternalPermanentError(
                f"gce: get {zone}/{group}: reply has no targetSize", system=SYSTEM
            ) from None
        raw_actions, raw_status = mig.get("currentActions"), mig.get("status")
        actions: dict[str, Any] = raw_actions if isinstance(raw_actions, dict) else {}
        status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
        stable = status.get("isStable") if isinstance(status.get("isStable"), bool) else None
        creating = int(actions.get("creating") or 0) + int(
            actions.get("creatingWithoutRetries") or 0
        )
        if stable is True and not creating:  # nothing under way: no failed creation either
            return Fulfilment(zone, group, target, creating=0, stable=True)
        codes: Counter[str] = Counter()
        failed, detail = 0, ""
        for mi in self._managed(group, zone=zone):
            errs = _last_errors(mi)
            if not errs or not str(mi.get("currentAction", "")).startswith("CREATING"):
                continue
            failed += 1
            codes[str(errs[0].get("code") or "UNKNOWN")] += 1
            detail = detail or str(errs[0].get("message") or "")
        return Fulfilment(zone, group, target, not_created=failed, creating=creating,
                          stable=stable, errors=tuple(codes.most_common()),
                          detail=detail)  # fmt: skip

    def list_instances(self, group: str, *, zone: str) -> list[Instance]:
        out: list[Instance] = []
        for mi in self._managed(group, zone=zone):
            url = str(mi.get("instance", ""))
            name = url.rstrip("/").rsplit("/", 1)[-1]
            if not name:
                continue
            status = str(mi.get("instanceStatus") or mi.get("currentAction") or "UNKNOWN")
            version = mi.get("version")
            created = _parse_time(mi.get("creationTimestamp")) or _parse_time(
                version.get("creationTimestamp") if isinstance(version, dict) else None
            )
            out.append(Instance(name=name, zone=zone, status=status, created=created))
        return out

    def delete_instances(self, group: str, names: Sequence[str], *, zone: str) -> None:
        if not names:
            return
        what = f"delete {len(names)} instance(s) of {zone}/{group}"
        urls = [f"projects/{self.project}/zones/{zone}/instances/{n}" for n in names]
        op = self._call(
            "POST",
            self._mig_url(group, zone) + "/deleteInstances",
            body={"instances": urls},
            what=what,
            idempotent=False,  # a second call may name instances the first one deleted
        )
        self._wait(op, zone=zone, what=what)
        log.info("gce: deleted %s from %s/%s", ",".join(names), zone, group)
