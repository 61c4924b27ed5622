"""A loopback stand-in for nomadscale's ``/maintenance/report`` endpoint, for watcher tests:
it checks the bearer token, can fail the first reports (``fail_first``) or every report while
``down`` is set (503, as nomadscale when it is unreachable or busy), and records every
authorized attempt and every accepted report."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ReportSink:
    def __init__(self, token: str, *, fail_first: int = 0) -> None:
        self.token = token
        self.fail_first = fail_first
        self.down = threading.Event()  # while set: every report gets a 503
        self.attempts: list[dict[str, Any]] = []  # every authorized report, accepted or not
        self.reports: list[dict[str, Any]] = []  # the accepted ones (202)
        self.got = threading.Event()  # set at the first accepted report
        self.cond = threading.Condition()
        sink = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = sink._answer(self.headers.get("Authorization"), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def _answer(self, auth: str | None, body: bytes) -> int:
        if auth != f"Bearer {self.token}":
            return 401
        doc = json.loads(body)
        with self.cond:
            self.attempts.append(doc)
            if self.down.is_set():
                status = 503
            elif self.fail_first > 0:
                self.fail_first -= 1
                status = 503
            else:
                self.reports.append(doc)
                self.got.set()
                status = 202
            self.cond.notify_all()
        return status

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.srv.server_address[1]}/maintenance/report"

    def wait(self, pred: Callable[[], bool], timeout: float = 10) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout=timeout)

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
