"""TwinServer: the Nomad HTTP API over a ``Cluster`` on a loopback port (threaded, HTTP/1.1,
optional TLS), with ACL checks, fault injection and blocking queries."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from nomadscale.sim import jobspec
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.model import ApiError, NotFound, RawJSON

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0
JITTER_FRACTION = 16  # nomad/structs/structs.go JitterFraction
POLL_S = 0.05
_GO_DURATION = re.compile(r"^(\d+(?:\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    if text.isdigit():
        return float(text) * 1e-9
    if not _GO_DURATION.match(text):
        raise ValueError(text)
    return sum(
        float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    )


def parse_bool(text: str | None) -> bool:
    return (text or "").strip() in ("1", "t", "T", "true", "TRUE", "True")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    raw_body: bytes
    headers: dict[str, str]
    params: tuple[str, ...] = ()
    raw_path: str = ""  # as sent (percent-escapes kept): routes match on it
    _json: Any = field(default=None, repr=False)

    @property
    def namespace(self) -> str:
        return self.query.get("namespace") or "default"

    def json(self, *, required: bool = True) -> Any:
        if self._json is None:
            if not self.raw_body.strip():
                if required:
                    raise ApiError(400, "Request body is empty")
                return {}
            try:
                self._json = jobspec.decode(json.loads(self.raw_body))
            except ValueError as exc:
                raise ApiError(400, f"Failed to decode request body: {exc}") from None
        return self._json


ReadFn = Callable[[Cluster, Request], tuple[Any, int]]
WriteFn = Callable[[Cluster, Request], Any]


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    fn: Callable[[Cluster, Request], Any]
    read: bool  # reads return (body, index) and may block
    index_header: bool = True


def route(
    methods: str,
    pattern: str,
    fn: Callable[[Cluster, Request], Any],
    *,
    read: bool | None = None,
    index_header: bool = True,
) -> Route:
    ms = frozenset(methods.split())
    is_read = ms == {"GET"} if read is None else read
    return Route(ms, re.compile(f"^{pattern}$"), fn, is_read, index_header)


def _routes() -> list[Route]:
    from nomadscale.sim import routes_jobs, routes_nodes

    return routes_jobs.ROUTES + routes_nodes.ROUTES


class TwinServer:
    """Serve ``cluster`` over HTTP. ``start()`` returns self; ``address`` is the base URL."""

    def __init__(
        self,
        cluster: Cluster,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``rng``: the source of the blocking queries' jitter (seeded with the cluster's
        seed by default, so runs repeat)."""
        self.cluster = cluster
        self.rng = rng if rng is not None else random.Random(cluster.seed)
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.routes = _routes()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        if self._httpd is None:
            raise RuntimeError("TwinServer is not started")
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> TwinServer:
        handler = _make_handler(self)
        httpd = _QuietServer((self.host, self.port), handler)
        httpd.daemon_threads = True
        if self.ssl_context is not None:
            httpd.socket = self.ssl_context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="nomad-twin",
            daemon=True,
        )
        self._thread.start()
        log.info("nomad twin serving at %s", self.address)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            with self.cluster.lock:
                self.cluster.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> TwinServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- request handling -------------------------------------------------------------

    def handle(self, req: Request) -> tuple[int, dict[str, str], bytes] | None:
        """Returns (status, headers, body) or None to drop the connection."""
        c = self.cluster
        decision = c.faults.check(req.method, req.path)
        if decision.latency_s > 0:
            time.sleep(decision.latency_s)
        if decision.drop:
            return None
        try:
            if decision.fail is not None:
                raise ApiError(*decision.fail)
            # Match on the escaped path so "parent%2Fdispatch-1" (how Go's client and the
            # adapter escape IDs) is one segment, then unescape each captured value.
            path = req.raw_path or req.path
            matched = [r for r in self.routes if r.pattern.match(path)]
            if not matched:
                raise ApiError(404, "Invalid URL")
            chosen = next((r for r in matched if req.method in r.methods), None)
            if chosen is None:
                raise ApiError(405, "Invalid method")
            m = chosen.pattern.match(path)
            assert m is not None
            req.params = tuple(unquote(g) if g is not None else "" for g in m.groups())
            self._check_acl(req)
            if c.faults.leaderless:
                raise ApiError(500, "No cluster leader")
            if chosen.read:
                return self._read(chosen, req)
            with c.lock:
                c.process_due()
                body = chosen.fn(c, req)
                c.settle()
                index = c.index
                payload = _dump(body)
            headers = {"X-Nomad-Index": str(index)} if chosen.index_header else {}
            return 200, {**headers, "Content-Type": "application/json"}, payload
        except ApiError as err:
            text = err.message.encode()
            return err.status, {"Content-Type": "text/plain; charset=utf-8"}, text

    def _check_acl(self, req: Request) -> None:
        want = self.cluster.acl_token
        if not want or req.path.startswith("/v1/status/"):
            return
        token = req.headers.get("x-nomad-token", "")
        auth = req.headers.get("authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if not token:
            raise ApiError(403, "Permission denied")
        if token != want:
            raise ApiError(403, "ACL token not found")

    def _read(self, r: Route, req: Request) -> tuple[int, dict[str, str], bytes]:
        """A read, blocking while ``index`` is given and the result's index is not past it.
        Like nomad/rpc.go blockingRPC: the wait (default and cap 300 s) gets a random stagger
        of up to wait/16 (``helper.RandomStagger(wait / structs.JitterFraction)``), and a
        missing object is a blocking query like any other on its table's index: the 404
        comes when it returns, with the index headers set (the HTTP handlers call setMeta
        before ``CodedError(404, ...)``, e.g. command/agent/deployment_endpoint.go
        deploymentQuery)."""
        c = self.cluster
        try:
            min_index = int(req.query.get("index") or 0)
            if min_index < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, "Invalid index") from None
        wait = MAX_WAIT_S
        if req.query.get("wait"):
            try:
                wait = min(parse_go_duration(req.query["wait"]), MAX_WAIT_S)
            except ValueError:
                raise ApiError(400, "Invalid wait time") from None
        if min_index > 0:
            wait += self.rng.random() * wait / JITTER_FRACTION
        deadline = time.monotonic() + wait
        missing: NotFound | None = None
        with c.lock:
            while True:
                c.process_due()
                try:
                    body, index = r.fn(c, req)
                    missing = None
                except NotFound as err:
                    body, index, missing = None, err.index, err
                index = max(int(index), 1)
                remaining = deadline - time.monotonic()
                if min_index <= 0 or index > min_index or remaining <= 0 or (self._httpd is None):
                    break
                c.cond.wait(timeout=min(remaining, POLL_S))
            payload = _dump(body) if missing is None else missing.message.encode()
        headers = {
            "Content-Type": "application/json",
            "X-Nomad-Index": str(index),
            "X-Nomad-KnownLeader": "true",
            "X-Nomad-LastContact": "0",
        }
        if missing is not None:
            headers["Content-Type"] = "text/plain; charset=utf-8"
            return missing.status, headers, payload
        next_token = req.query.get("_next_token")
        if next_token:
            headers["X-Nomad-NextToken"] = next_token
        return 200, headers, payload


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | ssl.SSLError | TimeoutError):
            return  # the client went away (timeouts, dropped connections)
        log.exception("twin request from %s failed", client_address)


def _dump(body: Any) -> bytes:
    if isinstance(body, RawJSON):
        return bytes(body)
    return json.dumps(body, separators=(",", ":")).encode()


def _make_handler(twin: TwinServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "nomad-twin"

        def setup(self) -> None:
            super().setup()
            with contextlib.suppress(OSError):  # headers and body go out without Nagle delays
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("twin %s", format % args)

        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            raw_path = url.path.rstrip("/") or "/"
            req = Request(self.command, unquote(raw_path), query, raw, headers, raw_path=raw_path)
            try:
                out = twin.handle(req)
            except Exception:  # a twin bug must still answer like a server would
                log.exception("twin error on %s %s", self.command, url.path)
                out = 500, {"Content-Type": "text/plain"}, b"internal twin error"
            if out is None:
                self.close_connection = True
                return
            status, hdrs, body = out
            self.send_response(status)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    return Handler
