"""``nomadscale policy validate|show`` through click's runner and one real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from nomadscale.cli.cmd_policy import policy
from nomadscale.config.validate import load_policy
from tests.config.helpers import ERROR_LINE, SHIPPED, write
from tests.config.test_validate import five_mistakes_text

ROOT = SHIPPED.parents[1]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(policy, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_validate_ok_prints_one_line_per_file() -> None:
    code, out, _ = run("validate", str(SHIPPED))
    assert (code, out) == (0, f"OK {SHIPPED} (ekyc-ml)\n")


def test_validate_reports_every_error_and_exits_1(tmp_path: Path) -> None:
    text, _ = five_mistakes_text()
    bad = write(tmp_path, text, "bad.yaml")
    code, out, _ = run("validate", str(SHIPPED), str(bad))
    lines = out.splitlines()
    assert code == 1
    assert lines[0] == f"OK {SHIPPED} (ekyc-ml)"
    assert len(lines) == 6
    assert all(re.match(ERROR_LINE, ln) and ln.startswith(f"{bad}:") for ln in lines[1:])


def test_validate_duplicate_names_and_empty_dir_exit_1(tmp_path: Path) -> None:
    write(tmp_path, SHIPPED.read_text(encoding="utf-8"), "copy.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run("validate", str(SHIPPED), str(tmp_path), str(empty))
    assert code == 1
    assert f"{empty}: no policy files (*.yaml, *.yml) here" in out
    assert f"{tmp_path / 'copy.yaml'}:4: name: policy 'ekyc-ml' is also defined in" in out


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = run("validate", str(SHIPPED), str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert err == f"error: no such file or directory: {tmp_path / 'nope'}\n"
    assert run("validate")[0] == 2  # no PATH at all


def test_show_prints_effective_policy_that_loads_again(tmp_path: Path) -> None:
    code, out, _ = run("show", str(SHIPPED))
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["target"]["namespace"] == "ekyc"
    assert shown["alerting"]["failed_cycles_before_alert"] == 3
    assert shown["deploy"]["sli"]["max_latency"] == "800ms"
    assert shown["zones"]["list"][0]["name"] == "asia-southeast2-a"
    again = load_policy(write(tmp_path, out, "again.yaml"))
    assert again.to_yaml_dict() == load_policy(SHIPPED).to_yaml_dict()


def test_show_invalid_file_exits_1_with_errors_on_stderr(tmp_path: Path) -> None:
    bad = write(tmp_path, "name: x\n")
    code, out, err = run("show", str(bad))
    assert (code, out) == (1, "")
    assert all(re.match(ERROR_LINE, ln) for ln in err.splitlines())
    assert run("show", str(tmp_path / "nope"))[0] == 2


def test_real_process_has_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, "name: x\ncycle: [\n", "bad.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "nomadscale.cli.cmd_policy", "validate"]
    proc = subprocess.run(
        [*cmd, str(SHIPPED), str(bad)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == f"OK {SHIPPED} (ekyc-ml)"
    assert re.match(ERROR_LINE, proc.stdout.splitlines()[1])
    assert "Traceback" not in proc.stderr + proc.stdout
