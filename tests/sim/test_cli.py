"""``nomadscale sim serve`` starts a twin that answers over HTTP, and rejects bad options."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import requests
from click.testing import CliRunner

from nomadscale.cli.cmd_sim import sim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_with_acl(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    port = _free_port()
    code = (
        "import sys; from nomadscale.cli.cmd_sim import sim; "
        "sim.main(args=sys.argv[1:], prog_name='sim')"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--port",
            str(port),
            "--nodes",
            "4",
            "--zones",
            "a,b",
            "--acl-token-file",
            str(token),
            "--speed",
            "10",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/nodes"
        for _ in range(100):
            try:
                r = requests.get(url, headers={"X-Nomad-Token": "abc"}, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        assert sorted(n["Datacenter"] for n in r.json()) == ["a", "a", "b", "b"]
        assert requests.get(url, timeout=1).status_code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_rejects_bad_options(tmp_path):
    result = CliRunner().invoke(sim, ["serve", "--zones", " , "])
    assert result.exit_code != 0
    assert "--zones" in str(result.exception) or "--zones" in result.output
