"""More Nomad behaviours nomadscale relies on or meets (third file): id prefixes on the list
endpoints, and a drain's Meta, which says whose drain it is (healing tells the autoscaler's
scale-in drain from its own and from an operator's by it). Runs against the twin, or
unchanged against a real Nomad with NOMADSCALE_TEST_NOMAD_ADDR set; each test names the Nomad
source it follows."""

from __future__ import annotations

import pytest

from tests.contract.conftest import World, seg

NS = 1_000_000_000


def _odd(world: World, path: str, prefix: str) -> tuple[int, str]:
    r = world.api.call("GET", path, params={"prefix": prefix, "namespace": "*"}, ok=False)
    return r.status_code, r.text.strip()


EVEN = "Input (without hyphens) must be even length"


@pytest.mark.parametrize(
    ("path", "lookup"),
    [("/allocations", "alloc lookup failed: "), ("/nodes", "node lookup failed: "),
     ("/evaluations", "eval lookup failed: "), ("/deployments", "")],
)  # fmt: skip
def test_an_odd_length_id_prefix_is_a_server_error(world: World, path: str, lookup: str) -> None:
    """Allocations, nodes, evaluations and deployments are indexed by UUID: a prefix query
    is go-memdb txn.Get(table, "id_prefix", p), whose UUIDFieldIndex.PrefixFromArgs
    (index.go parseString) refuses an odd number of hex digits; txn.go getIndexValue wraps it
    as ``index error: ...``, the state store's AllocsByIDPrefix / NodesByIDPrefix /
    EvalsByIDPrefix as ``<x> lookup failed: ...`` (DeploymentsByIDPrefix does not), and the
    HTTP agent answers the RPC error with a 500. The Nomad CLI never sends one
    (command/helpers.go sanitizeUUIDPrefix drops the last character)."""
    ids = {"/allocations": world.alloc_id, "/nodes": world.node_id, "/evaluations": world.eval_id}
    known = ids.get(path, "01234567-89ab-cdef-0123-456789abcdef")
    assert _odd(world, path, known[:7]) == (500, f"{lookup}index error: {EVEN}")
    assert _odd(world, path, known[:10]) == (500, f"{lookup}index error: {EVEN}")  # 8-1
    status, _ = _odd(world, path, known[:6])
    assert status == 200
    if path in ids:  # an even prefix finds it, and a full id is a prefix too
        for n in (8, 9, 11, 36):  # hyphens do not count
            found = world.api.call("GET", path, params={"prefix": known[:n], "namespace": "*"})
            assert known in [x["ID"] for x in found.json()], n


def test_a_non_hex_id_prefix_is_a_server_error_too(world: World) -> None:
    """parseString hex-decodes the prefix: encoding/hex's InvalidByteError (``%#U``)."""
    assert _odd(world, "/allocations", "zz") == (
        500,
        "alloc lookup failed: index error: Invalid UUID: encoding/hex: invalid byte: U+007A 'z'",
    )


def test_jobs_take_any_prefix(world: World) -> None:
    """Jobs are indexed by (Namespace, ID) strings (nomad/state/schema.go jobTableSchema:
    StringFieldIndex): any prefix, odd or not."""
    jobs = world.api.call("GET", "/jobs", params={"prefix": world.job_id[:7]}).json()
    assert world.job_id in [j["ID"] for j in jobs]


def test_a_drains_meta_says_whose_it_is_until_the_next_drain(world: World) -> None:
    """nomad/node_endpoint.go UpdateDrain and nomad/state/state_store.go
    updateNodeDrainImpl: a new drain records its Meta in LastDrain; an update of a running
    drain keeps both StartedAt (the strategy's and LastDrain's) and replaces the Meta only
    with a non-empty one ("keep existing if they didn't provide it"); a cancel keeps it,
    Status ``canceled``. DrainStrategy is structs.DrainStrategy with its DrainSpec inlined;
    list stubs carry LastDrain (structs.Node.Stub)."""
    nid = world.node_id
    path = f"/node/{seg(nid)}"
    world.cleanup.append(
        lambda: world.api.call("POST", f"{path}/drain", ok=False,
                               body={"NodeID": nid, "DrainSpec": None, "MarkEligible": True})
    )  # fmt: skip
    spec = {"Deadline": 3600 * NS, "IgnoreSystemJobs": True}
    scale_in = {"drained_by": "nomadscale", "decision_id": "d-contract"}
    world.api.call("POST", f"{path}/drain", body={"NodeID": nid, "DrainSpec": spec,
                                                  "Meta": scale_in})  # fmt: skip
    node = world.api.call("GET", path).json()
    strategy, last = node["DrainStrategy"], node["LastDrain"]
    assert sorted(strategy) == ["Deadline", "ForceDeadline", "IgnoreSystemJobs", "StartedAt"]
    assert (strategy["Deadline"], strategy["IgnoreSystemJobs"]) == (3600 * NS, True)
    assert (last["Status"], last["Meta"]) == ("draining", scale_in)
    stub = next(n for n in world.api.call("GET", "/nodes").json() if n["ID"] == nid)
    assert stub["LastDrain"]["Meta"] == scale_in and stub["Drain"] is True
    # an update without Meta (a shorter deadline): still the first drainer's
    spec2 = {"Deadline": 1800 * NS, "IgnoreSystemJobs": True}
    world.api.call("POST", f"{path}/drain", body={"NodeID": nid, "DrainSpec": spec2})
    node2 = world.api.call("GET", path).json()
    assert node2["LastDrain"]["Meta"] == scale_in
    assert node2["LastDrain"]["StartedAt"] == last["StartedAt"]
    assert node2["DrainStrategy"]["StartedAt"] == strategy["StartedAt"]
    assert node2["DrainStrategy"]["Deadline"] == 1800 * NS
    # an update with Meta: now it is theirs
    healing = {"nomadscale.run": "r-contract", "nomadscale.runbook": "gpu-host-maintenance"}
    world.api.call("POST", f"{path}/drain", body={"NodeID": nid, "DrainSpec": spec2,
                                                  "Meta": healing})  # fmt: skip
    assert world.api.call("GET", path).json()["LastDrain"]["Meta"] == healing
    # cancelled: the Meta stays, to say whose drain it was
    world.api.call("POST", f"{path}/drain", body={"NodeID": nid, "DrainSpec": None,
                                                  "MarkEligible": True})  # fmt: skip
    node3 = world.api.call("GET", path).json()
    assert node3["DrainStrategy"] is None and node3["SchedulingEligibility"] == "eligible"
    assert (node3["LastDrain"]["Status"], node3["LastDrain"]["Meta"]) == ("canceled", healing)


@pytest.mark.parametrize(
    ("path", "lookup"),
    [("/node/{}", "node"), ("/allocation/{}", "alloc"), ("/evaluation/{}", "eval"),
     ("/deployment/{}", "deployment")],
)  # fmt: skip
def test_an_id_that_is_not_a_uuid_is_a_server_error_and_nomadscale_reads_it_as_not_found(
    world: World, path: str, lookup: str
) -> None:
    """An exact lookup (state store NodeByID / AllocByID / EvalByID / DeploymentByID) is
    go-memdb txn.First(table, "id", v): UUIDFieldIndex.FromArgs enforces 36 characters, the
    state store wraps it as ``<x> lookup failed: index error: ...``, the agent answers 500;
    a well-formed unknown ID is a 404. nomadscale's adapter took that 500 for a temporary
    failure and retried (a PagerDuty incident naming a node by name never started its
    run); it is a NotFoundError now, at once."""
    from nomadscale.core.errors import NotFoundError
    from nomadscale.integrations.nomad import NomadClient

    r = world.api.call("GET", path.format("web-1"), ok=False)
    assert (r.status_code, r.text.strip()) == (
        500,
        f"{lookup} lookup failed: index error: UUID must be 36 characters",
    )
    r = world.api.call("GET", path.format("00000000-0000-4000-8000-000000000000"), ok=False)
    assert r.status_code == 404
    if lookup == "node":
        client = NomadClient(address=world.target.address, token=world.target.token)
        with pytest.raises(NotFoundError):
            client.node("web-1")
