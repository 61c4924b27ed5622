"""In-place vs destructive updates: a new job version whose change in a group is confined to
its update block (or restart/kill settings) keeps that group's allocations running; a task
change (image, resources) replaces them. Specs are read back and re-registered over HTTP the
way the rollout does."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from tests.sim.helpers import ROOT, live_allocs, service_job

UPDATE = {
    "MaxParallel": 1,
    "Canary": 1,
    "AutoRevert": True,
    "MinHealthyTime": 10_000_000_000,
    "HealthyDeadline": 120_000_000_000,
    "ProgressDeadline": 300_000_000_000,
}


def _running(twin: Any, n: Any) -> dict[str, int]:
    n.jobs.register_job({"Job": service_job("web", count=3, update=UPDATE)})
    twin.advance(200)
    assert n.job.get_deployment("web")["Status"] == "successful"
    return {a["ID"]: a["JobVersion"] for a in live_allocs(n, "web")}


def test_reregistering_the_read_back_spec_is_no_new_version(twin: Any) -> None:
    n = twin.nomad()
    before = _running(twin, n)
    job = n.job.get_job("web")
    assert job["TaskGroups"][0]["Tasks"][0]["Resources"]["CPU"] == 100
    n.jobs.register_job({"Job": job})
    assert n.job.get_job("web")["Version"] == 0
    assert {a["ID"]: a["JobVersion"] for a in live_allocs(n, "web")} == before


def test_update_block_change_is_in_place(twin: Any) -> None:
    n = twin.nomad()
    before = _running(twin, n)
    job = n.job.get_job("web")
    tg = job["TaskGroups"][0]
    tg["Update"] = {**tg["Update"], "Canary": 0, "MaxParallel": 2}
    tg["Tasks"][0]["KillTimeout"] = 30_000_000_000
    n.jobs.register_job({"Job": job})
    twin.advance(60)
    assert n.job.get_job("web")["Version"] == 1
    after = {a["ID"]: a["JobVersion"] for a in live_allocs(n, "web")}
    assert set(after) == set(before) and set(after.values()) == {1}  # same allocs, new version
    assert not [e for e in twin.cluster.events if e["type"] == "alloc_stopped"]
    assert n.job.get_deployment("web")["Status"] == "successful"


def test_resources_change_is_destructive(twin: Any) -> None:
    n = twin.nomad()
    before = _running(twin, n)
    job = n.job.get_job("web")
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["CPU"] = 200
    job["TaskGroups"][0]["Update"]["Canary"] = 0
    n.jobs.register_job({"Job": job})
    for _ in range(5):
        twin.advance(100)
    after = {a["ID"]: a["JobVersion"] for a in live_allocs(n, "web")}
    assert not set(after) & set(before) and set(after.values()) == {1}


def test_field_name_case_does_not_depend_on_the_hash_seed() -> None:
    code = (
        "from nomadscale.sim.jobspec import decode;"
        "print(decode({'resources': {'cpu': 1, 'memorymb': 2}}))"
    )
    outs = set()
    for seed in ("0", "1", "2", "3", "4", "5"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        outs.add(r.stdout.strip())
    assert outs == {"{'Resources': {'CPU': 1, 'MemoryMB': 2}}"}
