"""The node side of the post-maintenance GPU check, as the maintenance-watcher job's
gpu-check task runs it: ``nomadscale gpu-check`` runs the check script, which reads
nvidia-smi and the kernel log and writes the raw output to the node's meta with
``nomad node meta apply``; nomadscale then reads the verdict from the (twin's) node meta.

nvidia-smi, journalctl and the nomad CLI are not installed here: small stand-ins on PATH play
them (the nomad one writes through the real HTTP API of the twin)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nomadscale.healing.gpucheck import GpuChecker
from nomadscale.integrations.nomad import NomadClient
from tests.harness.twin import Twin
from tests.healing.conftest import HEALTHY_SMI, REMAP_OK, XID_79

FAKE_NOMAD = """#!{python}
# nomad node meta apply -node-id ID k=v ...: through the HTTP API, like the real CLI
import os, sys
from nomadscale.integrations.nomad import NomadClient
args = sys.argv[1:]
assert args[:3] == ["node", "meta", "apply"], args
node = args[args.index("-node-id") + 1]
pairs = dict(a.split("=", 1) for a in args[args.index("-node-id") + 2:])
NomadClient(address=os.environ["NOMAD_ADDR"]).set_node_metadata(node, pairs)
"""


def _tool(bin_dir: Path, name: str, text: str) -> None:
    p = bin_dir / name
    p.write_text(text)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def _path_with_stand_ins(tmp_path: Path, *, xid: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "smi-query").write_text(HEALTHY_SMI)
    (tmp_path / "smi-remap").write_text("gpu_bus_id, gpu_uuid, a, b, c, d\n" + REMAP_OK)
    (tmp_path / "kernel").write_text(xid)
    _tool(bin_dir, "nvidia-smi", f"""#!/bin/sh
case "$1" in
  --query-gpu=*) cat {tmp_path}/smi-query ;;
  --query-remapped-rows=*) cat {tmp_path}/smi-remap ;;
  *) exit 2 ;;
esac
""")  # fmt: skip
    _tool(bin_dir, "journalctl", f"#!/bin/sh\ncat {tmp_path}/kernel\n")
    _tool(bin_dir, "nomad", FAKE_NOMAD.format(python=sys.executable))
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize(("xid", "healthy"), [("", True), (XID_79, False)])
def test_gpu_check_on_the_node_reports_a_verdict_nomadscale_reads(
    twin: Twin, tmp_path: Path, xid: str, healthy: bool
) -> None:
    node = next(iter(twin.cluster.nodes))
    nomad = NomadClient(address=twin.address)
    checker = GpuChecker(nomad)
    checker.start(node, "chk-1")
    assert checker.result(node, "chk-1", expected_gpus=1) is None  # not answered yet
    env = {**os.environ, "PATH": _path_with_stand_ins(tmp_path, xid=xid),
           "NOMAD_ADDR": twin.address, "NODE_ID": node}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "nomadscale", "gpu-check", "--check-id", "chk-1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    verdict = checker.result(node, "chk-1", expected_gpus=1)
    assert verdict is not None and verdict.healthy is healthy, verdict
    if not healthy:
        assert any("Xid 79" in r for r in verdict.reasons)


def test_gpu_check_without_a_check_id_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CHECK_ID", "NODE_ID")}
    done = subprocess.run(
        [sys.executable, "-m", "nomadscale", "gpu-check", "--node-id", "n1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --check-id: required (or set CHECK_ID)"]


def test_the_watcher_job_runs_the_installed_gpu_check_command() -> None:
    job = (
        Path(__file__).resolve().parents[2] / "jobs" / "maintenance-watcher.nomad.hcl"
    ).read_text()
    assert "/usr/local/bin/nomadscale gpu-check --check-id" in job
