"""The HTTP edge of the Nomad adapter: python-nomad requesters, error translation, retries.

Every call goes through :meth:`NomadTransport.call`, which

* sends the request with python-nomad's ``Requester`` (token header, namespace, region, TLS),
* turns python-nomad / requests exceptions into ``nomadscale.core.errors`` types with a
  one-line message that keeps Nomad's plain-text reason but never the token,
* retries idempotent calls (GETs) on temporary errors with exponential backoff and jitter,
  sleeping through the injected ``Clock``. Writes are never retried here.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import nomad
import nomad.api.base
import nomad.api.exceptions as nexc
import requests

from nomadscale.core.clock import Clock
from nomadscale.core.errors import (
    ConflictError,
    DeploymentActiveError,
    ExternalPermanentError,
    ExternalTemporaryError,
    NomadscaleError,
    NotFoundError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SYSTEM = "nomad"
_MAX_TEXT = 300

# Nomad answers 500 for some failures that retrying will not fix. Matched on the body text.
_PERMANENT_500: tuple[tuple[re.Pattern[str], type[ExternalPermanentError]], ...] = (
    (re.compile(r"deployment not found", re.I), NotFoundError),
    (re.compile(r"node not found", re.I), NotFoundError),
    (re.compile(r"job not found|job \S+ not found|alloc(ation)? not found", re.I), NotFoundError),
    (
        re.compile(r"can't (promote|pause|resume|fail|unblock) terminal deployment", re.I),
        ConflictError,
    ),
    (re.compile(r"enforcing job modify index", re.I), ConflictError),
    (re.compile(r"conflicting job modify index", re.I), ConflictError),
    (re.compile(r"has \d+/\d+ healthy allocations", re.I), ConflictError),
    (re.compile(r"eligibility to eligible while it is draining", re.I), ConflictError),
    (re.compile(r"invalid scheduling eligibility", re.I), ExternalPermanentError),
    (re.compile(r"job validation failed|validation failed", re.I), ExternalPermanentError),
    (re.compile(r"not a parameterized job|dispatch of stopped job", re.I), ExternalPermanentError),
    (
        re.compile(r"required meta|meta keys?\b|payload (exceeds|is|not)", re.I),
        ExternalPermanentError,
    ),
    (re.compile(r"job (is )?stopped|stopped job", re.I), ExternalPermanentError),
    # go-memdb's UUID index refuses a malformed ID (state store "<x> lookup failed: index
    # error: ..."): an exact ID that cannot exist is not found, a bad prefix the caller's
    # mistake; neither is worth a retry
    (
        re.compile(r"lookup failed: index error: (UUID must be 36|Invalid UUID:)", re.I),
        NotFoundError,
    ),
    (re.compile(r"index error: ", re.I), ExternalPermanentError),
)
_DEPLOYMENT_400 = re.compile(r"active deployment", re.I)


class ClientMetadata(nomad.api.base.Requester):  # type: ignore[misc]
    """``/v1/client/metadata``: dynamic node metadata, which python-nomad does not wrap."""

    ENDPOINT = "client/metadata"


def seg(value: str) -> str:
    """One URL path segment: dispatched job IDs contain ``/`` (Go client: url.PathEscape)."""
    return quote(value, safe="")


def one_line(text: str, *, secret: str | None = None, limit: int = _MAX_TEXT) -> str:
    if secret:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class NomadTransport:
    """python-nomad requesters plus the retry / error-translation policy."""

    def __init__(
        self,
        *,
        address: str,
        token: str | None,
        namespace: str | None,
        region: str | None,
        verify: bool | str,
        cert: tuple[str, str] | tuple[()],
        timeout: float,
        clock: Clock,
        max_retries: int,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address.rstrip("/")
        self.namespace = namespace
        self.timeout = timeout
        self.clock = clock
        self.max_retries = max(1, max_retries)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._rng = rng or random.Random()
        self._token = token
        self.session = requests.Session()
        # python-nomad's ``verify`` is typed bool but is handed to requests, which also takes
        # a CA bundle path.
        self.api = nomad.Nomad(
            address=self.address,
            token=token,
            namespace=namespace,
            region=region,
            verify=verify,  # type: ignore[arg-type]
            cert=cert,
            timeout=timeout,  # type: ignore[arg-type]
            session=self.session,
        )
        self.metadata = ClientMetadata(**self.api.requester_settings)

    def close(self) -> None:
        self.session.close()

    # --- the one path every request takes ------------------------------------------------

    def call(self, what: str, fn: Callable[[], T], *, idempotent: bool) -> T:
        """Run ``fn`` (one python-nomad request); translate errors; retry if idempotent."""
        attempts = self.max_retries if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except (nexc.BaseNomadException, requests.RequestException) as exc:
                err = self.translate(what, exc)
            if not isinstance(err, ExternalTemporaryError) or attempt == attempts:
                raise err
            delay = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
            delay *= 0.5 + self._rng.random() / 2  # jitter: 50-100 % of the step
            log.warning(
                "nomad %s failed (attempt %s/%s), retrying in %.2fs: %s",
                what,
                attempt,
                attempts,
                delay,
                err.message,
            )
            self.clock.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def translate(self, what: str, exc: BaseException) -> NomadscaleError:
        """Map a python-nomad or requests exception to a nomadscale error (one line)."""
        cause = exc.nomad_resp if isinstance(exc, nexc.BaseNomadException) else exc
        if isinstance(cause, requests.Response):
            return self._from_response(what, cause)
        if isinstance(cause, requests.exceptions.SSLError):
            # wrong CA, bad or expired certificate, hostname mismatch: retrying cannot fix it
            msg = one_line(
                f"nomad: {what}: TLS/certificate verification failed ({self.address}); "
                "check NOMAD_CACERT, NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY",
                secret=self._token,
            )
            return ExternalPermanentError(msg, system=SYSTEM)
        if isinstance(cause, requests.Timeout):
            kind = "timed out"
        elif isinstance(cause, requests.ConnectionError):
            kind = "connection failed"
        else:
            kind = f"request failed ({type(cause).__name__})"
        msg = one_line(f"nomad: {what}: {kind} ({self.address})", secret=self._token)
        return ExternalTemporaryError(msg, system=SYSTEM, status=None, retry_after=self.backoff_s)

    def _from_response(self, what: str, resp: requests.Response) -> NomadscaleError:
        status = resp.status_code
        body = one_line(resp.text or resp.reason or "", secret=self._token)
        msg = f"nomad: {what}: {status} {body}".rstrip()
        if status == 404:
            return NotFoundError(msg, system=SYSTEM, status=status)
        if status == 400 and _DEPLOYMENT_400.search(body):
            return DeploymentActiveError(msg, system=SYSTEM, status=status)
        if status == 409:
            return ConflictError(msg, system=SYSTEM, status=status)
        if 400 <= status < 500 and status != 429:
            return ExternalPermanentError(msg, system=SYSTEM, status=status)
        if status >= 500:
            for pattern, cls in _PERMANENT_500:
                if pattern.search(body):
                    return cls(msg, system=SYSTEM, status=status)
        retry_after = self.backoff_s
        header = resp.headers.get("Retry-After")
        if header and header.isdigit():
            retry_after = float(header)
        return ExternalTemporaryError(msg, system=SYSTEM, status=status, retry_after=retry_after)

    # --- helpers ---------------------------------------------------------------------------

    def get(
        self,
        requester: nomad.api.base.Requester,
        *segments: str,
        what: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> requests.Response:
        return self.call(
            what,
            lambda: requester.request(
                *segments,
                method="get",
                params=dict(params or {}),
                timeout=timeout or self.timeout,
            ),
            idempotent=True,
        )

    def get_all(
        self,
        requester: nomad.api.base.Requester,
        *segments: str,
        what: str,
        params: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """A list endpoint, following ``X-Nomad-NextToken`` pages when the server pages."""
        out: list[Any] = []
        query = dict(params or {})
        for _ in range(100_000):
            resp = self.get(requester, *segments, what=what, params=query)
            out.extend(json_body(resp) or [])
            token = resp.headers.get("X-Nomad-NextToken")
            if not token:
                return out
            query["next_token"] = token
        return out  # pragma: no cover

    def write(
        self,
        requester: nomad.api.base.Requester,
        *segments: str,
        what: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        method: str = "post",
    ) -> requests.Response:
        return self.call(
            what,
            lambda: requester.request(
                *segments, method=method, params=dict(params or {}), json=body
            ),
            idempotent=False,
        )


def index_of(resp: requests.Response) -> int:
    try:
        return int(resp.headers.get("X-Nomad-Index", "0"))
    except ValueError:
        return 0


def json_body(resp: requests.Response) -> Any:
    """The reply's JSON; a non-JSON 2xx body (a proxy page, a cut reply) is temporary."""
    try:
        return resp.json()
    except ValueError:
        raise ExternalTemporaryError(
            f"nomad: {resp.request.method} {urlsplit(resp.url).path}: reply is not JSON "
            f"({resp.status_code}, {len(resp.content)} bytes)",
            system=SYSTEM,
            status=resp.status_code,
        ) from None
