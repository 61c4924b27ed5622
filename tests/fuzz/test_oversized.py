"""Oversized inputs are refused early, with one clear message and bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from nomadscale.config.validate import MAX_FILE_BYTES, check_file
from nomadscale.config.yamlpos import MAX_TEXT_CHARS, load_yaml
from nomadscale.core.errors import ConfigError
from tests.config.helpers import shipped_data
from tests.fuzz.counts import tried

ROOT = Path(__file__).resolve().parents[2]


def test_policy_with_10000_zones_gives_one_error_fast(tmp_path: Path) -> None:
    tried("oversized")
    data = shipped_data()
    zone = data["zones"]["list"][0]
    data["zones"]["list"] = [dict(zone, name=f"z{i}", group=f"g{i}") for i in range(10_000)]
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    t0 = time.monotonic()
    policy, errors = check_file(path)
    elapsed = time.monotonic() - t0
    assert policy is None
    size = path.stat().st_size
    assert [str(e) for e in errors] == [
        f"{path}: file too large ({size} bytes, at most {MAX_FILE_BYTES})"
    ]
    assert elapsed < 1.0, elapsed


def test_long_list_in_a_small_file_gives_one_error(tmp_path: Path) -> None:
    """Under the size limit (flow style), a 5000-item list is still one error, not 5000."""
    tried("oversized")
    data = shipped_data()
    path = tmp_path / "long.yaml"
    text = yaml.safe_dump(data, sort_keys=False)
    zones = "[" + ", ".join(["{name: a}"] * 5000) + "]"
    text = text.replace("zones:\n  split: odd-even\n  list:", f"zones:\n  list: {zones}\n  x:")
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size < MAX_FILE_BYTES
    t0 = time.monotonic()
    policy, errors = check_file(path)
    assert time.monotonic() - t0 < 5.0
    assert policy is None
    assert len(errors) == 1, errors[:3]
    assert errors[0].field == "zones.list"
    assert errors[0].message == "too many items (5000, at most 100)"


def test_policy_file_over_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    tried("oversized")
    path = tmp_path / "huge.yaml"
    with path.open("w", encoding="utf-8") as fh:
        fh.write("name: x\nnotes: |\n")
        line = "  " + "y" * 98 + "\n"
        for _ in range(50_000):  # 5 MB
            fh.write(line)
    tracemalloc.start()
    try:
        policy, errors = check_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert policy is None
    assert len(errors) == 1
    assert (
        str(errors[0])
        == f"{path}: file too large ({path.stat().st_size} bytes, at most {MAX_FILE_BYTES})"
    )
    assert peak < 1_000_000, peak  # the file was never read


def test_yaml_text_over_limit_is_refused_for_every_caller() -> None:
    """load_yaml (policies and runbooks) refuses huge text without parsing it."""
    tried("oversized")
    with pytest.raises(ConfigError, match=r"file too large \(\d+ characters, at most 1000000\)"):
        load_yaml("a: " + "b" * MAX_TEXT_CHARS)


def test_deeply_nested_yaml_is_a_clear_error(tmp_path: Path) -> None:
    tried("oversized")
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 20_000 + "]" * 20_000 + "\n", encoding="utf-8")
    policy, errors = check_file(path)
    assert policy is None
    assert len(errors) == 1 and str(errors[0]).startswith(f"{path}:"), errors


def test_device_and_fifo_are_refused_without_reading(tmp_path: Path) -> None:
    """/dev/zero never ends and a FIFO blocks on open: neither is read."""
    tried("oversized")
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        policy, errors = check_file(path)
        assert policy is None
        assert [str(e) for e in errors] == [f"{path}: not a regular file"]


TRACE_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from nomadscale.core.errors import InputError
    from nomadscale.stages.history import load_trace
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    try:
        data = load_trace(sys.argv[1])
        out = {"result": "loaded", "rows": int(len(data.requests))}
    except InputError as exc:
        out = {"result": "refused", "message": str(exc)}
    except MemoryError:
        out = {"result": "MemoryError"}
    out["seconds"] = time.monotonic() - t0
    out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps(out))
    """
)


def test_trace_with_10_million_rows_is_refused_before_reading_it_all(tmp_path: Path) -> None:
    """10 million rows (~230 MB): refused with a message naming the file, in bounded memory.
    Runs in a child process under a 1.5 GB address-space cap so a loader without a limit
    cannot take the test run down with it."""
    tried("oversized")
    path = tmp_path / "huge.csv"
    row = b"2026-01-05T00:00:00Z,1\n"
    block = row * 100_000
    with path.open("wb") as fh:
        fh.write(b"timestamp,requests\n")
        for _ in range(100):
            fh.write(block)
    code = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))\n"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code + TRACE_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["result"] == "refused", out
    assert out["message"].startswith(f"{path}:"), out
    assert out["peak_mb"] < 100, out
    assert out["seconds"] < 5, out


def test_settings_and_token_files_are_bounded(tmp_path: Path) -> None:
    """The settings file and *_TOKEN_FILE are read like policies: regular files, bounded, and
    an alias bomb in the settings file is refused instead of expanded."""
    from nomadscale.config.settings import load_settings

    tried("oversized")
    bomb = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\nnomad_addr: *a8\n")
    cases = {
        "/dev/zero": "not a regular file",
        str(tmp_path / "bomb.yaml"): "document too large",
    }
    for path, want in cases.items():
        with pytest.raises(ConfigError, match=want) as info:
            load_settings({"NOMADSCALE_CONFIG": path})
        assert "\n" not in str(info.value)
    (tmp_path / "none").write_text("{}\n")
    with pytest.raises(ConfigError, match="NOMAD_TOKEN_FILE: token file /dev/zero: not a regular"):
        load_settings(
            {"NOMADSCALE_CONFIG": str(tmp_path / "none"), "NOMAD_TOKEN_FILE": "/dev/zero"}
        )


def test_settings_file_unknown_key_stays_on_one_line(tmp_path: Path) -> None:
    from nomadscale.config.settings import load_settings

    (tmp_path / "s.yaml").write_text('"a\\nfake: log": 1\n')
    with pytest.raises(ConfigError, match="unknown setting") as info:
        load_settings({"NOMADSCALE_CONFIG": str(tmp_path / "s.yaml")})
    assert "\n" not in str(info.value)


DEVICE_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from nomadscale.core.errors import NomadscaleError
    target = sys.argv[1]
    try:
        if target == "runbook":
            from nomadscale.healing.runbook import check_runbook
            rb, errors = check_runbook("/dev/zero")
            out = {"result": "errors" if errors else "loaded", "message": " ".join(errors)}
        elif target == "history":
            from nomadscale.stages.history import load_trace
            load_trace("/dev/zero")
            out = {"result": "loaded"}
        else:
            from nomadscale.integrations.tracefile import read_trace
            read_trace("/dev/zero")
            out = {"result": "loaded"}
    except NomadscaleError as exc:
        out = {"result": "errors", "message": str(exc)}
    except MemoryError:
        out = {"result": "MemoryError"}
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("target", ["runbook", "history", "tracefile"])
def test_device_files_are_refused_by_other_loaders(target: str) -> None:
    tried("oversized")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_CHILD, target],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-1000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["result"] == "errors" and "/dev/zero" in out["message"], out
