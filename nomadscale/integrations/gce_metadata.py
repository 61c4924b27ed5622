"""GCE metadata server client: the hanging GET on ``instance/maintenance-event``.

``MetadataClient.wait_maintenance_event(last_etag)`` returns ``(value, etag)`` when the value's
ETag differs from ``last_etag`` ("0" at start). Errors: 503 and connection problems ->
``ExternalTemporaryError``; other non-200 -> ``ExternalPermanentError``. A read timeout of the
hanging GET is not an error: it returns ``None`` (ask again with the same ETag).
"""

from __future__ import annotations

import logging

import httpx

from nomadscale.core.errors import ExternalPermanentError, ExternalTemporaryError

log = logging.getLogger(__name__)
SYSTEM = "gce-metadata"
DEFAULT_URL = "http://metadata.google.internal/computeMetadata/v1"
HEADERS = {"Metadata-Flavor": "Google"}


class MetadataClient:
    def __init__(
        self, *, base_url: str = DEFAULT_URL, hang_timeout_s: float = 120.0, connect_s: float = 5.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            headers=HEADERS,
            timeout=httpx.Timeout(hang_timeout_s, connect=connect_s),
            follow_redirects=False,
            trust_env=False,  # the metadata server is never reached through a proxy
        )

    def close(self) -> None:
        self._http.close()

    def get(self, path: str) -> str:
        return self._request(path, {}).text

    def wait_maintenance_event(self, last_etag: str = "0") -> tuple[str, str] | None:
        try:
            r = self._request(
                "instance/maintenance-event",
                {"wait_for_change": "true", "last_etag": last_etag},
            )
        except httpx.ReadTimeout:
            return None
        return r.text.strip(), r.headers.get("etag", last_etag)

    def _request(self, path: str, params: dict[str, str]) -> httpx.Response:
        url = f"{self.base_url}/{path.lstrip('/')}"
        try:
            r = self._http.get(url, params=params)
        except httpx.ReadTimeout:
            raise
        except httpx.HTTPError as exc:
            raise ExternalTemporaryError(
                f"metadata server: GET {path}: {type(exc).__name__}", system=SYSTEM
            ) from None
        if r.status_code == 200:
            return r
        if r.status_code in (429, 500, 502, 503, 504):
            raise ExternalTemporaryError(
                f"metadata server: GET {path}: HTTP {r.status_code}",
                system=SYSTEM,
                status=r.status_code,
            )
        raise ExternalPermanentError(
            f"metadata server: GET {path}: HTTP {r.status_code}",
            system=SYSTEM,
            status=r.status_code,
        )
