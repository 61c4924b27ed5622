"""A loopback GCE metadata server for ``instance/maintenance-event``.

Speaks the documented behaviour: ``Metadata-Flavor: Google`` is required (403 without), the
value is plain text with an ``ETag`` header, and ``?wait_for_change=true&last_etag=E`` hangs
until the value's ETag differs from ``E`` (or ``hang_s`` passes, then returns the same value).
``set_event(value)`` changes the value (new ETag); ``fail_next(503, n)`` answers the next
``n`` requests with that status, like the server during maintenance.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class MetadataServer:
    def __init__(self, *, hang_s: float = 5.0) -> None:
        self.value = "NONE"
        self.version = 0
        self.hang_s = hang_s
        self.failures: list[int] = []
        self.requests: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, text: str, etag: str | None = None) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/text")
                self.send_header("Metadata-Flavor", "Google")
                if etag:
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(parts.query).items()}
                with srv.cond:
                    srv.requests.append(
                        {
                            "path": parts.path,
                            "query": q,
                            "flavor": self.headers.get("Metadata-Flavor"),
                        }
                    )
                    srv.cond.notify_all()
                    if srv.failures:
                        self._send(srv.failures.pop(0), "service unavailable")
                        return
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._send(403, "Missing Metadata-Flavor:Google header.")
                    return
                if parts.path != "/computeMetadata/v1/instance/maintenance-event":
                    self._send(404, "not found")
                    return
                with srv.cond:
                    if q.get("wait_for_change") == "true":
                        last = q.get("last_etag", "0")
                        srv.cond.wait_for(lambda: srv.etag() != last, timeout=srv.hang_s)
                    value, etag = srv.value, srv.etag()
                self._send(200, value, etag)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def etag(self) -> str:
        return hashlib.sha1(f"{self.version}:{self.value}".encode()).hexdigest()[:16]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/computeMetadata/v1"

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.version += 1
            self.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def set_event(self, value: str) -> None:
        with self.cond:
            self.value = value
            self.version += 1
            self.cond.notify_all()

    def fail_next(self, status: int, n: int = 1) -> None:
        with self.cond:
            self.failures.extend([status] * n)
