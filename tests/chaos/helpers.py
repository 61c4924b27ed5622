"""Building blocks for the chaos suite: fault injectors the twin lacks, demand in a real
Prometheus, the service as a real process, and small polling helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nomadscale.sim.faults import Decision as FaultDecision
from nomadscale.sim.faults import FaultInjector
from tests.harness.promdata import Series

ROOT = Path(__file__).resolve().parents[2]


class HoldNth(FaultInjector):
    """The twin's faults plus: the ``nth`` request matching ``pattern`` (searched in
    ``"METHOD /path"``) hangs (``holding`` is set) until ``release`` is set, then its
    connection is dropped without being applied: the caller died during that call."""

    def __init__(self, pattern: str, nth: int = 2, hold_s: float = 60.0) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.nth, self.hold_s = nth, hold_s
        self.seen = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    def check(self, method: str, path: str) -> FaultDecision:
        if self.pattern.search(f"{method} {path}"):
            with self._lock:
                self.seen += 1
                mine = self.seen == self.nth
            if mine:
                self.holding.set()
                self.release.wait(self.hold_s)
                self.hits.append(f"hold+drop {method} {path}")
                return FaultDecision(drop=True)
        return super().check(method, path)


class HoldNthScale(HoldNth):
    """``HoldNth`` on the Scale API calls of ``job``: the caller died between two zones'
    scale calls. The twin has no "only the 2nd call" latency rule."""

    def __init__(self, job: str, nth: int = 2, hold_s: float = 60.0) -> None:
        super().__init__(rf"^POST /v1/job/{re.escape(job)}/scale$", nth=nth, hold_s=hold_s)


def level_series(
    level: float, *, start: float, end: float, step_s: float = 15.0, name: str = "demand"
) -> Series:
    ts = np.arange(start, end, step_s)
    return Series(name, {}, ts, np.full(len(ts), float(level)))


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def service_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))}
    base.pop("PROMETHEUS_URL", None)
    return {**base, "PYTHONPATH": str(ROOT), **extra}


def run_env(
    tmp_path: Path, policy: Any, *, nomad: str, consul: str, prometheus: str, prefix: str,
    lock_ttl: str, http_port: int, **extra: str,
) -> dict[str, str]:  # fmt: skip
    """The environment of a real ``nomadscale run`` over ``policy`` (written once to
    ``tmp_path/policies/ekyc.yaml``, with an empty settings file): the chaos tests' leader
    and standby processes differ only in their HTTP port."""
    import yaml

    policies = tmp_path / "policies"
    if not policies.exists():
        policies.mkdir()
        (policies / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
        (tmp_path / "settings.yaml").write_text("{}\n")
    return service_env(
        NOMAD_ADDR=nomad, CONSUL_HTTP_ADDR=consul, PROMETHEUS_URL=prometheus,
        NOMADSCALE_CONFIG=str(tmp_path / "settings.yaml"), NOMADSCALE_POLICIES=str(policies),
        NOMADSCALE_KV_PREFIX=prefix, NOMADSCALE_LOCK_TTL=lock_ttl,
        NOMADSCALE_HTTP_PORT=str(http_port), **extra,
    )  # fmt: skip


def start_service(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m nomadscale run ARGS`` as a real process, stderr to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "nomadscale", "run", *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class Drift:
    """Someone else keeps setting ``group`` back to ``count`` (every ``every_s``), so every
    cycle of a leader has a write to make. Its own scale events carry no nomadscale meta."""

    def __init__(self, address: str, *, job: str, namespace: str, group: str, count: int = 1,
                 every_s: float = 0.3) -> None:  # fmt: skip
        from nomadscale.integrations.nomad import NomadClient

        self.nomad = NomadClient(address=address, max_retries=1, timeout=2)
        self.job, self.namespace, self.group, self.count = job, namespace, group, count
        self.every_s = every_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, name="drift", daemon=True)

    def _loop(self) -> None:
        from nomadscale.core.errors import NomadscaleError

        while not self._stop.wait(self.every_s):
            try:
                st = self.nomad.job_status(self.job, namespace=self.namespace)
                if st.groups[self.group].desired != self.count:
                    self.nomad.scale(self.job, self.group, self.count, message="drift",
                                     namespace=self.namespace)  # fmt: skip
            except NomadscaleError:
                continue

    def __enter__(self) -> Drift:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


def leader_scale_times(cluster: Any) -> list[Any]:
    """Times of the twin's scale events written by nomadscale (decision id in the meta)."""
    return [
        e["time"]
        for e in list(cluster.events)
        if e["type"] == "scale" and (e.get("meta") or {}).get("nomadscale.decision_id")
    ]


class TokenServer:
    """A loopback OAuth 2.0 token endpoint for a service account (RFC 7523 JWT bearer grant,
    what ``google.oauth2.service_account.Credentials`` sends to the key file's ``token_uri``):
    it checks the assertion's RS256 signature against the key it issued and its claims, then
    answers ``{"access_token": ..., "expires_in": 3600}``. ``key_file(path)`` writes a service
    account JSON whose ``token_uri`` is this server, for ``GOOGLE_APPLICATION_CREDENTIALS``."""

    EMAIL = "nomadscale@proj.iam.gserviceaccount.com"
    AUDIENCE = "https://oauth2.googleapis.com/token"

    def __init__(self, *, token: str = "ya29.loopback-token") -> None:
        import http.server

        from cryptography.hazmat.primitives.asymmetric import rsa

        self.token = token
        self.refuse = False  # True: every grant is refused (a disabled or deleted key)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.granted: list[dict[str, Any]] = []  # the verified assertion claims
        self.refused: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                code, body = owner._grant(self.rfile.read(n).decode())
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)  # fmt: skip

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/token"

    def key_file(self, path: Path) -> Path:
        from cryptography.hazmat.primitives import serialization

        pem = self._key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()  # fmt: skip
        path.write_text(json.dumps({
            "type": "service_account", "project_id": "proj", "private_key_id": "k1",
            "private_key": pem, "client_email": self.EMAIL, "client_id": "1",
            "token_uri": self.url,
        }))  # fmt: skip
        path.chmod(0o600)
        return path

    def _grant(self, form: str) -> tuple[int, dict[str, Any]]:
        import base64
        import urllib.parse

        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(part: str) -> bytes:
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        fields = dict(urllib.parse.parse_qsl(form))
        try:
            assert fields.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer"
            head, claims, sig = fields["assertion"].split(".")
            self._key.public_key().verify(b64(sig), f"{head}.{claims}".encode(),
                                          padding.PKCS1v15(), hashes.SHA256())  # fmt: skip
            got = json.loads(b64(claims))
            # google-auth signs for Google's endpoint whatever the key file's token_uri
            assert got["iss"] == self.EMAIL and got["aud"] == self.AUDIENCE, got
            assert "auth/compute" in got.get("scope", "") and got["exp"] > time.time(), got
            assert not self.refuse, "refused by the test"
        except (AssertionError, KeyError, ValueError, InvalidSignature) as e:
            self.refused.append(repr(e))
            return 400, {"error": "invalid_grant", "error_description": "bad assertion"}
        self.granted.append(got)
        return 200, {"access_token": self.token, "expires_in": 3600, "token_type": "Bearer"}

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class GceFaults:
    """A loopback HTTP proxy in front of the twin's Compute endpoint
    (``nomadscale.sim.compute``), adding the faults that endpoint lacks: error replies
    (429/503 with any headers) and zone operations that end in error or never finish.
    ``base_url`` is what ``GceMigPool`` takes. Requests are matched as ``"METHOD /path"``.
    """

    def __init__(self, upstream: str) -> None:
        import http.server
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self._mu = threading.Lock()
        self._rules: list[dict[str, Any]] = []
        self._ops: dict[str, dict[str, Any]] = {}  # operation name -> forced reply
        self.seen: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else b""
                code, body, headers = owner._serve(method, self.path, data)
                self._send(code, body, headers)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)  # fmt: skip

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.upstream.path}"

    def fail(self, pattern: str, status: int, *, times: int | None = 1,
             headers: dict[str, str] | None = None, message: str = "") -> None:  # fmt: skip
        """Answer matching requests with ``status`` (GCE's error body), not forwarded."""
        with self._mu:
            self._rules.append({"re": re.compile(pattern), "kind": "fail", "status": status,
                                "times": times, "headers": dict(headers or {}),
                                "message": message or f"simulated {status}"})  # fmt: skip

    def operation(self, pattern: str, *, ends: str, forward: bool = True,
                  times: int | None = 1) -> None:  # fmt: skip
        """The zone operation of matching writes ``ends`` in ``"error"`` (DONE with an error)
        or ``"never"`` (RUNNING forever); ``forward``: the write reaches the twin."""
        with self._mu:
            self._rules.append({"re": re.compile(pattern), "kind": "op", "ends": ends,
                                "forward": forward, "times": times})  # fmt: skip

    def clear(self) -> None:
        """No more faults (operations already forced keep their answer)."""
        with self._mu:
            self._rules.clear()

    def _take(self, target: str) -> dict[str, Any] | None:
        with self._mu:
            self.seen.append(target)
            for r in self._rules:
                if r["re"].search(target) and (r["times"] is None or r["times"] > 0):
                    if r["times"] is not None:
                        r["times"] -= 1
                    return r
        return None

    def _forward(self, method: str, path: str, data: bytes) -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPConnection(self.upstream.hostname or "", self.upstream.port,
                                          timeout=10)  # fmt: skip
        try:
            conn.request(method, path, body=data or None,
                         headers={"Content-Type": "application/json"})  # fmt: skip
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _serve(self, method: str, path: str, data: bytes) -> tuple[int, bytes, dict[str, str]]:
        import json

        target = f"{method} {path.split('?', 1)[0]}"
        op_name = path.split("?", 1)[0].rsplit("/operations/", 1)
        if len(op_name) == 2:
            with self._mu:
                forced = self._ops.get(op_name[1])
            if forced is not None:
                return 200, json.dumps(forced).encode(), {}
        rule = self._take(target)
        if rule is not None and rule["kind"] == "fail":
            body = {"error": {"code": rule["status"], "message": rule["message"], "errors": []}}
            return rule["status"], json.dumps(body).encode(), rule["headers"]
        if rule is not None and rule["kind"] == "op":
            name = f"operation-chaos-{len(self._ops) + 1}"
            if rule["forward"]:
                self._forward(method, path, data)
            reply: dict[str, Any] = {"kind": "compute#operation", "name": name,
                                     "status": "RUNNING", "progress": 0}  # fmt: skip
            final = dict(reply)
            if rule["ends"] == "error":
                final.update(status="DONE", progress=100, httpErrorStatusCode=400,
                             error={"errors": [{"code": "RESOURCE_NOT_READY",
                                                "message": "simulated operation error"}]})  # fmt: skip
            with self._mu:
                self._ops[name] = final
            return 200, json.dumps(reply).encode(), {}
        code, body = self._forward(method, path, data)
        return code, body, {}

    def __enter__(self) -> GceFaults:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass
class MigRig:
    """The fleet the partial-failure walks share (test_walk_chaos2, test_walk_gce2): 3 nodes
    per zone in MIGs mig-a/b, the worker job ``ekyc/ml-worker``, a service on a simulated
    clock; the walks add their own fault points."""

    twin: Any
    sim: Any
    svc: Any
    demand: dict[str, float]
    clock: Any
    nomad: Any
    kv: Any
    prefix: str

    def records(self) -> list[dict[str, Any]]:
        entries = sorted(self.kv.list(f"{self.prefix}/decisions/ekyc/"), key=lambda e: e.key)
        return [json.loads(e.value) for e in entries]

    def counts(self) -> dict[str, int]:
        st = self.nomad.job_status("ml-worker", namespace="ekyc")
        return {g: st.groups[g].desired for g in sorted(st.groups)}

    def sizes(self) -> dict[str, int]:
        return {"zone-a": self.sim.size("zone-a", "mig-a"),
                "zone-b": self.sim.size("zone-b", "mig-b")}  # fmt: skip


def mig_fleet(twin_factory: Callable[..., Any]) -> tuple[Any, Any, Any]:
    """(twin, compute sim, simulated clock): 6 GPU nodes in zones a/b, MIGs mig-a/b over
    them, namespace ``ekyc``."""
    from nomadscale.service.simulate import _SimClock
    from nomadscale.sim.compute import ComputeSim

    twin = twin_factory(nodes=6, node_pool="gpu")
    twin.cluster.add_namespace("ekyc")
    sim = ComputeSim(twin.cluster, project="proj")
    sim.add_mig(name="mig-a", zone="zone-a", node_pool="gpu")
    sim.add_mig(name="mig-b", zone="zone-b", node_pool="gpu")
    return twin, sim, _SimClock(twin.clock, twin.cluster.advance)
