"""A loopback HTTP server speaking the PagerDuty APIs nomadscale uses.

* Events API v2: ``POST /v2/enqueue`` (202 ``{"status","message","dedup_key"}``; 400 on a
  body without ``routing_key``/``event_action``/payload fields).
* REST API v2: ``POST /incidents/{id}/notes`` (``{"note": {"content"}}`` -> 200 ``{"note"}``),
  ``GET /incidents/{id}/notes``, ``PUT /incidents/{id}`` (``{"incident": {"type", "status"}}``),
  ``GET /incidents/{id}``. Requires ``Authorization: Token token=...`` and a ``From`` header.

``fail_next(status, n)`` makes the next ``n`` requests answer ``status``. Everything received is
kept in ``events``, ``notes``, ``incidents`` and ``requests`` for assertions.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_NOTES = re.compile(r"^/incidents/([A-Za-z0-9]+)/notes$")
_INCIDENT = re.compile(r"^/incidents/([A-Za-z0-9]+)$")


@dataclass
class PagerDutyState:
    api_key: str = "pd-api-key-test"
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


class PagerDutyServer:
    def __init__(self, *, api_key: str = "pd-api-key-test") -> None:
        self.state = PagerDutyState(api_key=api_key)
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw or b"null")
                except ValueError:
                    return None

            def _handle(self, method: str) -> None:
                body = self._body()
                with state.lock:
                    state.requests.append((method, self.path, dict(self.headers.items())))
                    if state.failures:
                        status = state.failures.pop(0)
                        self._reply(status, {"error": {"message": "injected", "code": 2000}})
                        return
                if self.path == "/v2/enqueue" and method == "POST":
                    self._enqueue(body)
                    return
                if self.headers.get("Authorization") != f"Token token={state.api_key}":
                    self._reply(401, {"error": {"message": "Unauthorized", "code": 2006}})
                    return
                m = _NOTES.match(self.path)
                if m and method == "POST":
                    content = (body or {}).get("note", {}).get("content")
                    if not isinstance(content, str) or not self.headers.get("From"):
                        self._reply(400, {"error": {"message": "Invalid Input", "code": 2001}})
                        return
                    note = {"id": uuid.uuid4().hex[:14].upper(), "content": content}
                    with state.changed:
                        state.notes.setdefault(m.group(1), []).append(note)
                        state.changed.notify_all()
                    self._reply(200, {"note": note})
                    return
                if m and method == "GET":
                    with state.lock:
                        self._reply(200, {"notes": list(state.notes.get(m.group(1), []))})
                    return
                m = _INCIDENT.match(self.path)
                if m and method == "PUT":
                    inc = (body or {}).get("incident") or {}
                    if inc.get("status") not in ("acknowledged", "resolved"):
                        self._reply(400, {"error": {"message": "Invalid Input", "code": 2001}})
                        return
                    with state.changed:
                        cur = state.incidents.setdefault(m.group(1), {"id": m.group(1)})
                        cur["status"] = inc["status"]
                        state.changed.notify_all()
                        self._reply(200, {"incident": dict(cur)})
                    return
                if m and method == "GET":
                    with state.lock:
                        cur = state.incidents.get(m.group(1))
                    if cur is None:
                        self._reply(404, {"error": {"message": "Not Found", "code": 2100}})
                    else:
                        self._reply(200, {"incident": dict(cur)})
                    return
                self._reply(404, {"error": {"message": "Not Found", "code": 2100}})

            def _enqueue(self, body: Any) -> None:
                ok = (
                    isinstance(body, dict)
                    and isinstance(body.get("routing_key"), str)
                    and body.get("event_action") in ("trigger", "acknowledge", "resolve")
                )
                if ok and body["event_action"] == "trigger":
                    p = body.get("payload") or {}
                    ok = all(p.get(k) for k in ("summary", "source", "severity"))
                if not ok:
                    self._reply(
                        400, {"status": "invalid event", "message": "Event object is invalid"}
                    )
                    return
                dedup = body.get("dedup_key") or uuid.uuid4().hex
                with state.changed:
                    state.events.append(body)
                    state.changed.notify_all()
                self._reply(
                    202, {"status": "success", "message": "Event processed", "dedup_key": dedup}
                )

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_GET(self) -> None:
                self._handle("GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> PagerDutyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, status: int, n: int = 1) -> None:
        with self.state.lock:
            self.state.failures.extend([status] * n)

    def open_incident(self, incident_id: str) -> None:
        with self.state.lock:
            self.state.incidents[incident_id] = {"id": incident_id, "status": "triggered"}

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(state)`` is true (checked on every change)."""
        with self.state.changed:
            return bool(self.state.changed.wait_for(lambda: predicate(self.state), timeout))
