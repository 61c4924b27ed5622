"""Transport behaviour: blocking queries, headers, ACL, faults, leader, TLS."""

from __future__ import annotations

import threading
import time

import nomad
import pytest
import requests

from nomadscale.sim import Cluster, TwinServer
from tests.sim.helpers import scale, service_job


def _background_get(url: str, params: dict) -> dict:
    out: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        r = requests.get(url, params=params, timeout=30)
        out.update(response=r, elapsed=time.monotonic() - t0)

    th = threading.Thread(target=run)
    th.start()
    out["thread"] = th
    return out


def test_read_headers(twin):
    r = requests.get(f"{twin.address}/v1/nodes", timeout=5)
    assert int(r.headers["X-Nomad-Index"]) > 0
    assert r.headers["X-Nomad-KnownLeader"] == "true"
    assert r.headers["X-Nomad-LastContact"] == "0"
    assert r.headers["Content-Type"] == "application/json"
    leader = requests.get(f"{twin.address}/v1/status/leader", timeout=5)
    assert leader.json() == "127.0.0.1:4647"


def test_blocking_query_wakes_on_scale(twin):
    twin.nomad().jobs.register_job({"Job": service_job("web", count=1)})
    twin.advance(200)
    url = f"{twin.address}/v1/job/web/scale"
    index = int(requests.get(url, timeout=5).headers["X-Nomad-Index"])
    bg = _background_get(url, {"index": index, "wait": "20s"})
    time.sleep(0.3)
    assert bg["thread"].is_alive()  # still blocked
    assert scale(twin.address, "web", "web", 2).status_code == 200
    bg["thread"].join(10)
    r = bg["response"]
    assert int(r.headers["X-Nomad-Index"]) > index
    assert r.json()["TaskGroups"]["web"]["Desired"] == 2
    assert bg["elapsed"] < 5


def test_blocking_query_wakes_when_virtual_time_moves(twin):
    twin.nomad().jobs.register_job({"Job": service_job("web", count=1)})
    url = f"{twin.address}/v1/allocations"
    index = int(requests.get(url, timeout=5).headers["X-Nomad-Index"])
    bg = _background_get(url, {"index": index, "wait": "20s"})
    time.sleep(0.2)
    twin.clock.advance(200)  # the clock alone, not cluster.advance: the twin notices
    bg["thread"].join(10)
    r = bg["response"]
    assert int(r.headers["X-Nomad-Index"]) > index
    assert r.json()[0]["ClientStatus"] == "running"


def test_blocking_query_times_out_with_same_index(twin):
    url = f"{twin.address}/v1/nodes"
    index = int(requests.get(url, timeout=5).headers["X-Nomad-Index"])
    t0 = time.monotonic()
    r = requests.get(url, params={"index": index, "wait": "300ms"}, timeout=5)
    assert 0.25 < time.monotonic() - t0 < 3
    assert int(r.headers["X-Nomad-Index"]) == index
    assert requests.get(url, params={"wait": "soon", "index": 1}, timeout=5).text == (
        "Invalid wait time"
    )
    assert requests.get(url, params={"index": "x"}, timeout=5).text == "Invalid index"


def test_acl(twin_factory):
    t = twin_factory(acl_token="s3cret")
    r = requests.get(f"{t.address}/v1/nodes", timeout=5)
    assert (r.status_code, r.text) == (403, "Permission denied")
    r = requests.get(f"{t.address}/v1/nodes", headers={"X-Nomad-Token": "wrong"}, timeout=5)
    assert (r.status_code, r.text) == (403, "ACL token not found")
    ok = requests.get(
        f"{t.address}/v1/nodes", headers={"Authorization": "Bearer s3cret"}, timeout=5
    )
    assert ok.status_code == 200
    assert len(t.nomad(token="s3cret").nodes.get_nodes()) == 6
    with pytest.raises(nomad.api.exceptions.URLNotAuthorizedNomadException):
        t.nomad().nodes.get_nodes()


def test_fail_fault_counts_down(twin):
    twin.cluster.faults.fail("/v1/nodes$", status=503, times=2)
    n = twin.nomad()
    for _ in range(2):
        with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
            n.nodes.get_nodes()
        assert e.value.nomad_resp.status_code == 503
    assert len(n.nodes.get_nodes()) == 6
    assert twin.cluster.faults.hits == ["fail GET /v1/nodes"] * 2


def test_drop_latency_and_no_leader(twin):
    faults = twin.cluster.faults
    faults.drop("^GET /v1/jobs$", times=1)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{twin.address}/v1/jobs", timeout=5)
    assert requests.get(f"{twin.address}/v1/jobs", timeout=5).json() == []
    faults.latency("/v1/jobs", 0.3)
    with pytest.raises(requests.Timeout):
        requests.get(f"{twin.address}/v1/jobs", timeout=0.1)
    faults.clear()
    faults.no_leader()
    r = requests.get(f"{twin.address}/v1/status/leader", timeout=5)
    assert (r.status_code, r.text) == (500, "No cluster leader")
    assert requests.get(f"{twin.address}/v1/jobs", timeout=5).status_code == 500
    faults.no_leader(on=False)
    assert requests.get(f"{twin.address}/v1/status/leader", timeout=5).status_code == 200


def test_tls(tmp_path):
    import ssl
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    with TwinServer(Cluster.build(nodes=2), ssl_context=ctx) as twin:
        assert twin.address.startswith("https://")
        r = requests.get(f"{twin.address}/v1/nodes", verify=str(cert), timeout=5)
        assert len(r.json()) == 2
