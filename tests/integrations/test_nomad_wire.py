"""NomadClient request shapes and error translation over real loopback HTTP, against a tiny
scripted server (independent of the twin): what goes on the wire and how replies map to
nomadscale errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import (
    ConflictError,
    DeploymentActiveError,
    ExternalPermanentError,
    ExternalTemporaryError,
    NotFoundError,
)
from nomadscale.integrations.nomad import NomadClient

TOKEN = "wire-secret-token-9f8e7d"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Script:
    """Replies per "METHOD /path" (popped in order; the last one repeats)."""

    replies: dict[str, list[tuple[int, Any, dict[str, str]]]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def on(self, key: str, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.replies.setdefault(key, []).append((status, body, headers or {}))


@pytest.fixture
def stub() -> Iterator[tuple[Script, str]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            script.seen.append(
                Seen(
                    self.command,
                    url.path,
                    parse_qs(url.query),
                    dict(self.headers.items()),
                    json.loads(raw) if raw else None,
                )
            )
            queue = script.replies.get(f"{self.command} {url.path}") or [(404, "Invalid path", {})]
            status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            ctype = "text/plain" if isinstance(body, str) else "application/json"
            self.send_header("Content-Type", ctype)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _client(address: str, clock: FakeClock | None = None, **kw: Any) -> NomadClient:
    return NomadClient(address=address, token=TOKEN, clock=clock or FakeClock(), **kw)


def test_scale_body_and_token_header(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("POST /v1/job/ml/scale", 200, {"EvalID": "e1", "Index": 9})
    c = _client(addr, namespace="gpu")
    assert c.scale("ml", "ml-worker-a", 4, message="predictive", meta={"f": 3.7}) == "e1"
    req = script.seen[-1]
    assert req.body == {
        "Count": 4,
        "Target": {"Job": "ml", "Group": "ml-worker-a"},
        "Message": "predictive",
        "Meta": {"f": 3.7},
    }
    assert req.headers["X-Nomad-Token"] == TOKEN
    assert req.query["namespace"] == ["gpu"]


def test_get_500_retried_with_clock_then_ok(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("GET /v1/status/leader", 500, "rpc error: EOF")
    script.on("GET /v1/status/leader", 500, "rpc error: EOF")
    script.on("GET /v1/status/leader", 200, '"10.0.0.1:4647"')
    clock = FakeClock()
    assert _client(addr, clock).leader() == "10.0.0.1:4647"
    assert len(clock.sleeps) == 2
    assert len(script.seen) == 3


def test_post_500_not_retried(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("POST /v1/job/ml/scale", 500, "rpc error: raft apply timed out")
    clock = FakeClock()
    with pytest.raises(ExternalTemporaryError) as err:
        _client(addr, clock).scale("ml", "g", 1, message="m")
    assert err.value.status == 500
    assert "raft apply timed out" in str(err.value)
    assert len(script.seen) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("status", "text", "kind"),
    [
        (400, "job scaling blocked due to active deployment", DeploymentActiveError),
        (400, 'task group "x" specified for scaling does not exist in job', ExternalPermanentError),
        (404, 'job "ml" not found', NotFoundError),
        (500, "deployment not found", NotFoundError),
        (500, "can't promote terminal deployment", ConflictError),
        (
            500,
            "Enforcing job modify index 3: job exists with conflicting job modify index: 5",
            ConflictError,
        ),
        (500, "No cluster leader", ExternalTemporaryError),
        (503, "rpc error", ExternalTemporaryError),
    ],
)
def test_status_and_text_map_to_errors(
    stub: tuple[Script, str], status: int, text: str, kind: type[Exception]
) -> None:
    script, addr = stub
    script.on("POST /v1/deployment/promote/d1", status, text)
    with pytest.raises(kind) as err:
        _client(addr).promote("d1")
    assert type(err.value) is kind
    assert text.split()[0] in str(err.value)
    assert "\n" not in str(err.value)


def test_403_echoing_the_token_is_scrubbed(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("GET /v1/nodes", 403, f"ACL token not found: {TOKEN}\nsecond line")
    c = _client(addr)
    with pytest.raises(ExternalPermanentError) as err:
        c.list_nodes()
    assert err.value.status == 403
    assert TOKEN not in str(err.value)
    assert TOKEN not in repr(err.value)
    assert "***" in str(err.value)
    assert "\n" not in str(err.value)
    assert TOKEN not in repr(c)


def test_dispatch_puts_idempotency_token_in_query(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("POST /v1/job/prefetch/dispatch", 200, {"DispatchedJobID": "prefetch/dispatch-1"})
    child = _client(addr).dispatch(
        "prefetch", meta={"image": "ml:2"}, payload=b"hi", idempotency_token="t-1"
    )
    assert child == "prefetch/dispatch-1"
    req = script.seen[-1]
    assert req.query["idempotency_token"] == ["t-1"]
    assert req.body == {"Meta": {"image": "ml:2"}, "Payload": "aGk="}


def test_dispatched_child_id_is_path_escaped(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("GET /v1/job/prefetch%2Fdispatch-1/allocations", 200, [])
    assert _client(addr).job_allocations("prefetch/dispatch-1") == []


def test_drain_sends_meta_and_deadline_ns(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("POST /v1/node/n1/drain", 200, {"NodeModifyIndex": 3, "Index": 3})
    _client(addr).drain("n1", deadline_s=3600, meta={"reason": "gce-maintenance"})
    assert script.seen[-1].body == {
        "NodeID": "n1",
        "DrainSpec": {"Deadline": 3_600_000_000_000, "IgnoreSystemJobs": True},
        "Meta": {"reason": "gce-maintenance"},
    }


def test_eligibility_false_sends_ineligible(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("POST /v1/node/n1/eligibility", 200, {"NodeModifyIndex": 3})
    c = _client(addr)
    c.set_eligibility("n1", False)
    assert script.seen[-1].body["Eligibility"] == "ineligible"
    c.set_eligibility("n1", True)
    assert script.seen[-1].body["Eligibility"] == "eligible"


def test_watch_deployment_sends_index_and_wait(stub: tuple[Script, str]) -> None:
    script, addr = stub
    dep = {"ID": "d1", "JobID": "ml", "Status": "running", "TaskGroups": None}
    script.on("GET /v1/deployment/d1", 200, dep, {"X-Nomad-Index": "42"})
    info, index = _client(addr).watch_deployment("d1", index=41, wait_s=30)
    assert (info.id, info.status, index) == ("d1", "running", 42)
    assert script.seen[-1].query["index"] == ["41"]
    assert script.seen[-1].query["wait"] == ["30000ms"]


def test_list_nodes_counts_allocs_with_one_filtered_call(stub: tuple[Script, str]) -> None:
    script, addr = stub
    nodes = [
        {"ID": f"n{i}", "Name": f"gpu-{i}", "Datacenter": "zone-a", "NodePool": "gpu"}
        for i in range(3)
    ]
    allocs = [
        {"ID": "a1", "NodeID": "n0", "JobType": "service"},
        {"ID": "a2", "NodeID": "n0", "JobType": "batch"},
        {"ID": "a3", "NodeID": "n1", "JobType": "service"},
        {"ID": "a4", "NodeID": "n1", "JobType": "sysbatch"},
    ]
    script.on("GET /v1/nodes", 200, nodes)
    script.on("GET /v1/allocations", 200, allocs)
    got = _client(addr).list_nodes(node_pool="gpu", datacenter="zone-a", with_allocs=True)
    assert [n.allocs_running for n in got] == [2, 1, 0]
    assert [s.path for s in script.seen] == ["/v1/nodes", "/v1/allocations"]
    assert script.seen[0].query["filter"] == ['NodePool == "gpu" and Datacenter == "zone-a"']
    assert "DesiredStatus" in script.seen[1].query["filter"][0]
    assert script.seen[1].query["namespace"] == ["*"]


def test_list_follows_next_token_pages(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("GET /v1/nodes", 200, [{"ID": "n1"}], {"X-Nomad-NextToken": "n2"})
    script.on("GET /v1/nodes", 200, [{"ID": "n2"}])
    assert [n.id for n in _client(addr).list_nodes()] == ["n1", "n2"]
    assert script.seen[1].query["next_token"] == ["n2"]


def test_non_json_success_is_temporary(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("GET /v1/status/leader", 200, "<html>proxy</html>")
    with pytest.raises(ExternalTemporaryError) as err:
        _client(addr, max_retries=1).leader()
    assert "not JSON" in str(err.value)


def test_client_metadata_get_and_post(stub: tuple[Script, str]) -> None:
    script, addr = stub
    reply = {
        "Meta": {"zone": "a", "gpu.health": "bad"},
        "Dynamic": {"gpu.health": "bad"},
        "Static": {"zone": "a"},
    }
    script.on("GET /v1/client/metadata", 200, reply)
    script.on("POST /v1/client/metadata", 200, {**reply, "Dynamic": {"gpu.health": None}})
    c = _client(addr)
    md = c.node_metadata("n1")
    assert md.meta["gpu.health"] == "bad"
    assert script.seen[-1].query["node_id"] == ["n1"]
    after = c.set_node_metadata("n1", {"gpu.health": None})
    assert after.dynamic == {"gpu.health": None}
    assert script.seen[-1].body == {"NodeID": "n1", "Meta": {"gpu.health": None}}


def test_register_with_enforce_index(stub: tuple[Script, str]) -> None:
    script, addr = stub
    script.on("POST /v1/job/ml", 200, {"EvalID": "e9", "JobModifyIndex": 12})
    eval_id = _client(addr).register_job({"ID": "ml", "Namespace": "team"}, enforce_index=11)
    assert eval_id == "e9"
    req = script.seen[-1]
    assert req.body == {
        "Job": {"ID": "ml", "Namespace": "team"},
        "EnforceIndex": True,
        "JobModifyIndex": 11,
    }
    assert req.query["namespace"] == ["team"]


def test_job_status_reads_scale_and_active_deployment(stub: tuple[Script, str]) -> None:
    script, addr = stub
    event = {
        "Time": 1_767_571_200_000_000_000,
        "Count": 3,
        "PreviousCount": 2,
        "Message": "up",
        "Error": False,
        "Meta": {"f": 1},
    }
    script.on(
        "GET /v1/job/ml/scale",
        200,
        {
            "JobID": "ml",
            "JobModifyIndex": 7,
            "TaskGroups": {"a": {"Desired": 3, "Running": 2, "Events": [event]}},
        },
    )
    script.on("GET /v1/job/ml/deployment", 200, {"ID": "d1", "Status": "running"})
    status = _client(addr).job_status("ml")
    assert status.active_deployment == "d1"
    assert status.groups["a"].desired == 3
    assert status.groups["a"].events[0].count == 3
    assert status.groups["a"].events[0].time.year == 2026
    script.on("GET /v1/job/ml/deployment", 200, {"ID": "d1", "Status": "successful"})
    script.replies["GET /v1/job/ml/deployment"].pop(0)
    assert _client(addr).job_status("ml").active_deployment is None


_GPU_EXHAUSTED = {
    "NodesEvaluated": 3,
    "NodesFiltered": 2,
    "NodesInPool": 6,
    "NodesAvailable": {"zone-b": 3},
    "ClassFiltered": None,
    "ConstraintFiltered": {"${node.datacenter} = zone-b": 2},
    "NodesExhausted": 3,
    "ClassExhausted": {"gpu-l4": 3},
    "DimensionExhausted": {"devices: nvidia/gpu": 3},
    "QuotaExhausted": None,
    "ResourcesExhausted": None,
    "Scores": None,
    "AllocationTime": 51000,
    "CoalescedFailures": 1,
}


def test_job_evaluations_parse_placement_failures(stub: tuple[Script, str]) -> None:
    """Nomad lists a job's evaluations newest first; a failed placement shows on the eval
    that tried it (with BlockedEval) and on the blocked eval itself (CreateBlockedEval)."""
    script, addr = stub
    blocked = {"ID": "e2", "Status": "blocked", "TriggeredBy": "queued-allocs",
               "JobModifyIndex": 40, "CreateIndex": 42, "ModifyIndex": 42,
               "FailedTGAllocs": {"b": _GPU_EXHAUSTED}, "BlockedEval": ""}  # fmt: skip
    tried = {"ID": "e1", "Status": "complete", "TriggeredBy": "job-register",
             "JobModifyIndex": 40, "CreateIndex": 41, "ModifyIndex": 43, "BlockedEval": "e2",
             "FailedTGAllocs": {"b": _GPU_EXHAUSTED}, "QueuedAllocations": {"b": 2},
             "DeploymentID": "d1"}  # fmt: skip
    script.on("GET /v1/job/ml/evaluations", 200, [blocked, tried])
    evals = _client(addr).job_evaluations("ml", namespace="team")
    assert script.seen[-1].query["namespace"] == ["team"]
    assert [(e.id, e.status, e.blocked_eval) for e in evals] == [
        ("e1", "complete", "e2"), ("e2", "blocked", ""),
    ]  # fmt: skip
    assert evals[0].deployment_id == "d1" and evals[0].job_modify_index == 40
    f = evals[0].failed["b"]
    assert (f.unplaced, f.nodes_evaluated, f.nodes_exhausted) == (2, 3, 3)
    assert f.explain() == (
        '2 allocation(s) not placed, dimension "devices: nvidia/gpu" exhausted on 3 node(s), '
        'constraint "${node.datacenter} = zone-b" filtered 2 node(s)'
    )


def test_job_evaluations_with_malformed_failures_is_a_permanent_error(
    stub: tuple[Script, str],
) -> None:
    script, addr = stub
    script.on("GET /v1/job/ml/evaluations", 200, [{"ID": "e1", "FailedTGAllocs": ["b"]}])
    with pytest.raises(ExternalPermanentError, match="FailedTGAllocs"):
        _client(addr).job_evaluations("ml")
