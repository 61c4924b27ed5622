"""Every job file the project ships parses through the Nomad parse API and registers."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomadscale.integrations.nomad import NomadClient

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.nomad.hcl"))


def test_all_four_job_files_are_shipped() -> None:
    names = {p.name for p in JOBS}
    assert {
        "ml-worker.nomad.hcl",
        "image-prefetch.nomad.hcl",
        "maintenance-watcher.nomad.hcl",
        "nomadscale.nomad.hcl",
    } <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_file_parses_and_registers(twin, path: Path) -> None:  # type: ignore[no-untyped-def]
    client = NomadClient(address=twin.address)
    job = client.parse_hcl(path.read_text())
    assert job["ID"] == path.name.removesuffix(".nomad.hcl")
    assert job["TaskGroups"], "a job needs at least one task group"
    if job.get("Namespace", "default") != "default":  # `nomad namespace apply` first
        twin.cluster.add_namespace(job["Namespace"])
    client.register_job(job)
    stored = client.get_job(job["ID"], namespace=job.get("Namespace"))
    assert stored.spec["ID"] == job["ID"]
    assert [g["Name"] for g in stored.spec["TaskGroups"]] == [g["Name"] for g in job["TaskGroups"]]
