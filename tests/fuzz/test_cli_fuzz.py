"""The command line: random argv (from the real commands, options and files, plus junk) exits
0, 1 or 2 with a message, never a traceback. Commands that talk to a live Nomad/Consul or loop
(deploy, prefetch, runbook run, watch-maintenance) get only their --help here."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomadscale.cli.main import _register, cli
from tests.fuzz.counts import tried

ROOT = Path(__file__).resolve().parents[2]
_register()

OFFLINE = [
    ["policy", "validate"],
    ["policy", "show"],
    ["backtest"],
    ["capacity"],
    ["runbook", "list"],
    ["runbook", "validate"],
    [],
    ["nope"],
]
HELP_ONLY = [["deploy", "start"], ["deploy", "status"], ["prefetch"], ["runbook", "run"]]
HELP_ONLY += [["watch-maintenance"], ["deploy", "abort"], ["deploy", "resume"]]


@pytest.fixture(autouse=True)
def _sandbox_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fuzzed --decisions-out/--plot values are relative paths (some with "../.."): run every
    command two levels deep in a temp dir so nothing lands in the repo or outside the sandbox."""
    cwd = tmp_path / "sandbox" / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("cli")
    trace = d / "trace.csv"
    rows = [
        f"2026-01-05T{h:02d}:{m:02d}:00Z,{100 + h * 10 + m}"
        for h in range(3)
        for m in range(0, 60, 10)
    ]
    trace.write_text("timestamp,requests\n" + "\n".join(rows) + "\n")
    (d / "bad.yaml").write_text("name: [\n")
    (d / "bin.csv").write_bytes(b"\x80\x81\x00")
    return [
        str(ROOT / "policies" / "ekyc-ml.yaml"),
        str(ROOT / "policies" / "catalog" / "gcp-gpu-shapes.yaml"),
        str(ROOT / "runbooks"),
        str(ROOT / "runbooks" / "node-down.yaml"),
        str(trace),
        str(d / "bad.yaml"),
        str(d / "bin.csv"),
        str(d / "missing.yaml"),
        str(d),
    ]


OPTIONS = [
    "--policy", "--trace", "--catalog", "--json", "--cycle", "--lead", "--zones",
    "--target-availability", "--min-workers", "--capacity-per-worker", "--start",
    "--worker-gpus", "--worker-gpu-memory", "--worker-vcpus", "--worker-ram", "--dir",
    "--help", "-h", "--version", "--plot", "--decisions-out", "--bogus", "--",
]  # fmt: skip
VALUES = [
    "0", "-1", "1e999", "nan", "inf", "20m", "1h", "0s", "-5m", "2", "0.99", "1.5", "abc",
    "", " ", "../../etc/passwd", "$(rm -rf /)", "{__class__}", "%s%n", "\x7f", "2026-01-05",
    "2026-13-45T99:99", "9" * 200,
]  # fmt: skip


def argv(files: list[str]) -> st.SearchStrategy[list[str]]:
    token = st.one_of(
        st.sampled_from(OPTIONS),
        st.sampled_from(VALUES),
        st.sampled_from(files),
        st.text(
            st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12
        ),
    )
    return st.tuples(st.sampled_from(OFFLINE), st.lists(token, max_size=8)).map(
        lambda t: [*t[0], *t[1]]
    )


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output[-500:])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )
    assert "Traceback" not in result.output, (args, result.output[-2000:])


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_argv_never_tracebacks(files: list[str], data: st.DataObject) -> None:
    args = data.draw(argv(files))
    tried("cli-argv")
    _run(args)


@pytest.mark.parametrize("cmd", HELP_ONLY, ids=" ".join)
def test_networked_commands_help(cmd: list[str]) -> None:
    tried("cli-argv")
    _run([*cmd, "--help"])


@pytest.mark.parametrize(
    "cmd",
    [
        ["policy", "validate"],
        ["policy", "show"],
        ["runbook", "validate"],
        ["runbook", "list", "--dir"],
    ],
    ids=" ".join,
)
def test_overlong_file_name_is_a_clear_error(cmd: list[str]) -> None:
    tried("cli-argv")
    _run([*cmd, "9" * 400])  # ENAMETOOLONG from the OS


@pytest.mark.parametrize(
    "cmd", [["policy", "validate"], ["policy", "show"], ["runbook", "validate"]], ids=" ".join
)
def test_nul_in_file_name_is_a_clear_error(cmd: list[str]) -> None:
    tried("cli-argv")
    _run([*cmd, "a\x00b"])
