"""An operator's walk through the docs: every command and flag README.md and ops/README.md
show exists (``--help`` of each), every ``--help`` says what the command exits with, every
setting nomadscale reads is documented and in the env example (and the docs name no setting
that does not exist), the systemd unit starts a real command with real flags, and the
commands the docs show refuse an operator's typo with one line instead of a traceback or a
write to the wrong Consul key."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config import settings as settings_mod
from nomadscale.core.errors import ConfigError
from nomadscale.service import systemd

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
OPS = ROOT / "ops" / "README.md"
UNIT = ROOT / "deploy" / "systemd" / "nomadscale.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "nomadscale.env.example"

# --- the command line the docs show --------------------------------------------------------


def _cli() -> click.Group:
    _register()
    return cli


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    """The command ``nomadscale WORDS...`` names, and the words after its path."""
    cmd: click.Command = _cli()
    path = ["nomadscale"]
    rest = list(words)
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    # a group alone is a reference to it (`nomadscale deploy`); with words, they must resolve
    assert not (isinstance(cmd, click.Group) and rest), f"{' '.join(path + rest)}: no such command"
    return cmd, rest


def _resolve_group(path: list[str]) -> click.Group:
    cmd: click.Command = _cli()
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    assert isinstance(cmd, click.Group)
    return cmd


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def _leaves(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _leaves(cmd, (*path, name))
        else:
            out.append((*path, name))
    return out


def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]


def _readme_command_lines() -> list[str]:
    """Every command line of README's Commands table, alternatives spelled out in full."""
    lines: list[str] = []
    top = set(_cli().commands)
    for row in _table_rows(README.read_text(), "## Commands"):
        for cell in row[:2]:
            for code in re.findall(r"`([^`]+)`", cell):
                words = code.split()
                if words[0] == "nomadscale":
                    words = words[1:]
                if not words or words[0] not in top:
                    continue
                group: list[str] = []
                for i, piece in enumerate(" ".join(words).split(" / ")):
                    pw = piece.split()
                    if i == 0:
                        head = _cli().commands[pw[0]]
                        group = [pw[0]] if isinstance(head, click.Group) else []
                    elif group and pw[0] in _resolve_group(group).commands:
                        pw = group + pw  # `runbook list / validate / run NAME`
                    lines.append(" ".join(pw))
    return lines


def _ops_command_lines() -> list[str]:
    """Every ``nomadscale ...`` line in the code blocks and backticks of the ops guide."""
    text = OPS.read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    found = re.findall(r"^\s*(?:sudo )?nomadscale ([^#\n]+)", blocks, flags=re.M)
    found += re.findall(r"`nomadscale ([^`]+)`", text)
    return [f.strip() for f in found]


def _check_line(line: str) -> None:
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("...", ""))
    cmd, rest = _resolve(words)
    flags = {w.split("=", 1)[0] for w in rest if w.startswith("--")}
    missing = flags - _options(cmd)
    assert not missing, f"`nomadscale {line}`: {cmd.name} has no {sorted(missing)}"
    result = CliRunner().invoke(_cli(), [*line.split()[: len(words) - len(rest)], "--help"])
    assert result.exit_code == 0, (line, result.output)


def test_every_command_line_of_the_readme_table_exists_with_its_flags() -> None:
    lines = _readme_command_lines()
    # the table covers every command the CLI offers
    assert {ln.split()[0] for ln in lines} == set(_cli().commands), lines
    for line in lines:
        _check_line(line)


def test_every_command_line_of_the_ops_guide_exists_with_its_flags() -> None:
    lines = _ops_command_lines()
    assert len(lines) >= 10, lines
    for line in lines:
        _check_line(line)


@pytest.mark.parametrize("path", _leaves(_cli()), ids=" ".join)
def test_every_help_says_what_the_command_exits_with(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(_cli(), [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # "exits 0 ...", "Exit status: 0 ...": a code, not just click's "Show this message and exit"
    said = re.search(r"\bexit(s| status:?)\s[^.]*\b[0-2]\b", result.output, flags=re.I)
    assert said, f"nomadscale {' '.join(path)} --help does not say what it exits with"


# --- settings: the docs, the env example and settings.py agree ----------------------------

# a *_FILE variable reads the token of the setting it names from a file
FILE_VARS = set(settings_mod._SECRET_FILES)
# variables the docs name that are not process settings, and why
NOT_SETTINGS = {
    "NOMADSCALE_PD_ROUTING_KEY": "named by the policy's alerting.pagerduty_routing_key_env",
    "NOMADSCALE_REPORT_URL": "the watcher job's env for its --report-url",
    "NOMADSCALE_TEST_NOMAD_ADDR": "the contract tests",
    "NOMADSCALE_TEST_NOMAD_TOKEN": "the contract tests",
    "NOMADSCALE_TEST_NOMAD_NODE_POOL": "the contract tests",
    "NOMADSCALE_EXPOSURE_MAX": "scripts/systemd-security.sh",
    "NOMADSCALE_UNIT_WAIT_S": "scripts/systemd-security.sh",
}
VAR = re.compile(r"\b((?:NOMADSCALE|NOMAD|CONSUL|PROMETHEUS)_[A-Z0-9_]*[A-Z0-9])\b")


def _settings_vars() -> set[str]:
    return set(settings_mod._ENV) | FILE_VARS | {"NOMADSCALE_CONFIG"}


def test_every_file_variable_is_one_settings_py_reads() -> None:
    # FILE_VARS above must be exactly what load_settings() reads: a token file it reads
    # with an env value of a missing file says so
    for var in FILE_VARS:
        with pytest.raises(ConfigError, match=var):
            settings_mod.load_settings({var: "/nonexistent/token"}, config_file=None)


def test_every_setting_is_documented_in_the_ops_guide_with_its_config_key() -> None:
    text = OPS.read_text()
    rows = _table_rows(text, "## Settings")
    by_var = {re.findall(r"`([A-Z_]+)`", r[0])[0]: r for r in rows if re.search(r"`[A-Z_]+`", r[0])}
    for var, (fld, _kind) in settings_mod._ENV.items():
        assert var in by_var, f"{var}: not in the settings table of ops/README.md"
        assert f"`{fld}`" in by_var[var][1], f"{var}: config-file key {fld} not in its row"
    for var in FILE_VARS | {"NOMADSCALE_CONFIG"}:
        assert f"`{var}`" in text, var


def test_the_docs_name_only_real_settings() -> None:
    real = _settings_vars() | set(NOT_SETTINGS)
    for doc in (README, OPS, ENV_EXAMPLE, UNIT, ROOT / "CONTRIBUTING.md"):
        named = set(VAR.findall(doc.read_text()))
        unknown = named - real
        assert not unknown, f"{doc.name} names settings nomadscale does not read: {unknown}"


def test_the_env_example_sets_every_setting_and_only_real_ones() -> None:
    assigned = re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M)
    assert len(assigned) == len(set(assigned)), "a variable twice in the env example"
    real = _settings_vars() | {"NOMADSCALE_PD_ROUTING_KEY"}
    assert set(assigned) <= real, set(assigned) - real
    # every setting is there (a token either plain or as its *_FILE)
    for var in settings_mod._ENV:
        assert var in assigned or f"{var}_FILE" in assigned, f"{var}: not in the env example"
    # the uncommented lines are a valid settings environment
    active = dict(
        ln.split("=", 1)
        for ln in ENV_EXAMPLE.read_text().splitlines()
        if ln and not ln.startswith("#") and "_FILE=" not in ln
    )
    loaded = settings_mod.load_settings(active, config_file=None)
    assert loaded.policies == "/etc/nomadscale/policies"


# --- the systemd unit --------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_a_real_command_and_its_watchdog_is_pinged_in_time() -> None:
    unit = _unit()
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    assert exec_start[0] == "/usr/local/bin/nomadscale"  # where both install guides link it
    _check_line(" ".join(exec_start[1:]))
    assert unit["Service"]["Type"] == "notify"
    watchdog_s = float(unit["Service"]["WatchdogSec"].removesuffix("s"))
    env = {"WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}
    half = systemd.watchdog_interval_s(env)
    assert half is not None and half <= watchdog_s / 2
    assert unit["Service"]["EnvironmentFile"] == "/etc/nomadscale/nomadscale.env"
    assert unit["Service"]["User"] == "nomadscale"


# --- an operator's typo gets one line, and never reaches Consul KV -------------------------


def _kv_get(addr: str, key: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"{addr}/v1/kv/{key}?raw", timeout=5) as r:
            return bytes(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _kv_put(addr: str, key: str, value: bytes) -> None:
    req = urllib.request.Request(f"{addr}/v1/kv/{key}", data=value, method="PUT")
    urllib.request.urlopen(req, timeout=5).close()


@pytest.mark.parametrize(
    "args",
    [
        ["override", "clear", "../leader"],
        ["resume", "../leader"],
        ["override", "set", "../leader", "--min", "1", "--reason", "typo"],
        ["scale", "../../x/leader", "--count", "1", "--reason", "typo"],
        ["pause", "a/../../leader", "--reason", "typo"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_policy_argument_that_is_a_kv_path_is_refused_and_writes_nothing(
    args: list[str], consul_agent, consul_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    prefix = consul_prefix.rstrip("/")
    sentinel = b'{"host": "ops-1", "pid": 42}'
    _kv_put(consul_agent.addr, f"{prefix}/leader", sentinel)  # the leader lock's holder
    _kv_put(consul_agent.addr, f"{prefix}/x/leader", sentinel)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul_agent.addr)
    monkeypatch.setenv("NOMADSCALE_KV_PREFIX", f"{prefix}/x")
    monkeypatch.setenv("NOMADSCALE_POLICIES", str(tmp_path))  # a laptop without policies
    monkeypatch.setenv("NOMADSCALE_CONFIG", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text("{}\n")
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "not a policy name" in result.output, result.output
    assert _kv_get(consul_agent.addr, f"{prefix}/leader") == sentinel
    assert _kv_get(consul_agent.addr, f"{prefix}/x/leader") == sentinel
    with urllib.request.urlopen(f"{consul_agent.addr}/v1/kv/{prefix}/?keys", timeout=5) as r:
        keys = json.load(r)
    assert sorted(keys) == [f"{prefix}/leader", f"{prefix}/x/leader"]  # nothing written


# --- sim serve: a bad job file or option is one line -------------------------------------


@pytest.mark.parametrize(
    ("content", "code", "needle"),
    [
        (
            'job "x" {\n  type = "service"\n  group "g" {\n    count = "abc"\n'
            '    task "t" {\n      driver = "docker"\n    }\n  }\n}\n',
            2,
            "TaskGroups.Count",
        ),
        (b"\xff\xfejob", 2, "UTF-8"),
        ('job "x" {\n  group "g" {\n', 2, "line 3"),
    ],
    ids=["bad-field", "not-utf8", "syntax"],
)
def test_sim_serve_names_a_bad_job_file_in_one_line(
    tmp_path: Path, content: str | bytes, code: int, needle: str
) -> None:
    job = tmp_path / "bad.nomad.hcl"
    if isinstance(content, bytes):
        job.write_bytes(content)
    else:
        job.write_text(content)
    result = CliRunner().invoke(_cli(), ["sim", "serve", "--port", "0", "--job", str(job)])
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(job) in lines[0] and needle in lines[0], lines


@pytest.mark.parametrize(
    "args",
    [
        ["--speed", "nan"],
        ["--speed", "inf"],
        ["--speed", "0"],
        ["--port", "70000"],
        ["--port", "-1"],
        ["--image-pull-mbps", "0"],
        ["--image-pull-mbps", "nan"],
    ],
    ids=" ".join,
)
def test_sim_serve_refuses_a_bad_option_in_one_line(args: list[str]) -> None:
    # a subprocess: an option that is wrongly accepted starts a server that never returns
    cmd = [sys.executable, "-m", "nomadscale", "sim", "serve", "--nodes", "0", "--port", "0", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sim serve {' '.join(args)}: accepted, served until killed")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert args[0] in done.stderr.strip().splitlines()[-1], done.stderr  # click: usage + error


# --- sim serve --gce-policy: the shipped policy's GCE node pool against the twin ----------

GCE_PROBE = """
import json, sys
from nomadscale.integrations.gce import GceMigPool
pool = GceMigPool(project="ekyc-prod", base_url=sys.argv[1], poll_s=0.05)  # default credentials
before = sorted(i.name for i in pool.list_instances("ekyc-gpu-a", zone="asia-southeast2-a"))
pool.resize("ekyc-gpu-a", len(before) + 1, zone="asia-southeast2-a")
print(json.dumps({"before": before, "size": pool.size("ekyc-gpu-a", zone="asia-southeast2-a")}))
"""


def test_sim_serve_serves_the_shipped_policys_gce_node_pool_with_default_credentials() -> None:
    """`plan` and `run` with policies/ekyc-ml.yaml scale its GCE MIGs: against the twin they
    need a Compute endpoint and credentials google.auth.default() finds (as on a GCE VM)."""
    cmd = [sys.executable, "-m", "nomadscale", "sim", "serve", "--port", "0", "--nodes", "4",
           "--speed", "100", "--job", str(ROOT / "jobs" / "ml-worker.nomad.hcl"),
           "--gce-policy", str(ROOT / "policies" / "ekyc-ml.yaml")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCE_", "GOOGLE_"))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        assert proc.stdout is not None
        exports: dict[str, str] = {}
        for line in proc.stdout:
            if line.startswith("export "):
                exports.update(kv.split("=", 1) for kv in line.split()[1:])
            if "GCE_METADATA_HOST" in exports:
                break
        assert {"NOMAD_ADDR", "NOMADSCALE_GCE_API_URL", "GCE_METADATA_IP"} <= set(exports), (
            proc.stderr.read() if proc.poll() is not None and proc.stderr else exports
        )
        probe = subprocess.run(
            [sys.executable, "-c", GCE_PROBE, exports["NOMADSCALE_GCE_API_URL"]],
            capture_output=True, text=True, timeout=60, check=False,
            env={**env, "HOME": "/nonexistent", **exports},
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        result = json.loads(probe.stdout)
        # the MIG adopted the twin's nodes of the datacenter ml-worker-a is pinned to
        assert result["before"] == ["gpu-zone-a-0000", "gpu-zone-a-0002"], result
        assert result["size"] == 3
        with urllib.request.urlopen(f"{exports['NOMAD_ADDR']}/v1/nodes", timeout=5) as r:
            nodes = json.load(r)
        assert sum(n["Datacenter"] == "zone-a" for n in nodes) == 3  # the new instance joined
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # and close the pipes
