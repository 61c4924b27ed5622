"""``nomadscale backtest`` as a capacity planner meets it: every broken trace and every bad
argument is one line naming the file:line or the argument, exit 1 (bad input) or 2 (usage),
never a traceback, and no output file is written (nor the trace overwritten) on any error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nomadscale.cli.main import _register, cli
from nomadscale.data import bundled_trace_path

SCORER = Path("/work/shared/bench/score.py")
HEADER = "timestamp,requests"
ROWS = bundled_trace_path().read_text(encoding="utf-8").splitlines()[1:]  # 10-min steps


def _write(tmp: Path, name: str, text: str, *, binary: bytes | None = None) -> Path:
    path = tmp / name
    if binary is not None:
        path.write_bytes(binary)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def _trace(rows: list[str]) -> str:
    return HEADER + "\n" + "\n".join(rows) + "\n"


def _run(*args: str) -> Result:
    _register()
    return CliRunner().invoke(cli, ["backtest", *args])


def _one_line_error(res: Result, code: int, says: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert says in lines[0], lines[0]
    assert res.stdout == "", res.stdout


def _mixed_steps() -> str:
    # 300 rows at 10 min, then the same days exported at 20 min (every other row, summed)
    out = ROWS[:300]
    for i in range(300, 700, 2):
        t, v = ROWS[i].split(",")
        out.append(f"{t},{int(v) + int(ROWS[i + 1].split(',')[1])}")
    return _trace(out)


BAD_TRACES = [
    ("header.csv", "time,requests\n" + "\n".join(ROWS[:50]) + "\n", "header.csv:1: header must be"),
    ("unsorted.csv", _trace([*ROWS[:10], ROWS[11], ROWS[10], *ROWS[12:50]]),
     "unsorted.csv:13: timestamp 2000-01-01T01:40:00Z is not after the previous row"),
    ("dup.csv", _trace([*ROWS[:10], ROWS[9], *ROWS[10:50]]),
     "dup.csv:12: timestamp 2000-01-01T01:30:00Z is not after the previous row"),
    ("mixed.csv", _mixed_steps(),
     "mixed.csv:302: rows from here on are 20m apart, but the trace's step is 10m"),
    ("naive.csv", _trace([r.replace("Z", "") for r in ROWS[:50]]),
     "naive.csv:2: timestamp '2000-01-01T00:00:00' has no time zone"),
    ("neg.csv", _trace([*ROWS[:5], "2000-01-01T00:50:00Z,-1", *ROWS[6:50]]),
     "neg.csv:7: requests must not be negative"),
    ("nan.csv", _trace([*ROWS[:5], "2000-01-01T00:50:00Z,NaN", *ROWS[6:50]]),
     "nan.csv:7: requests must be finite"),
    ("inf.csv", _trace([*ROWS[:5], "2000-01-01T00:50:00Z,inf", *ROWS[6:50]]),
     "inf.csv:7: requests must be finite"),
    ("empty.csv", "", "empty.csv: the file is empty"),
    ("one.csv", _trace(ROWS[:1]), "one.csv: needs at least 2 data rows, found 1"),
    ("short.csv", _trace(ROWS[:2]), "short.csv: too short for a backtest: 2 steps of 10m"),
    ("bom.csv", "\ufeff" + _trace(ROWS[:50]), "bom.csv:1: starts with a byte-order mark"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "says"), BAD_TRACES, ids=[c[0] for c in BAD_TRACES])
def test_bad_trace_is_one_line_and_writes_nothing(
    tmp_path: Path, name: str, text: str, says: str
) -> None:
    trace = _write(tmp_path, name, text)
    dec, png = tmp_path / "d.csv", tmp_path / "p.png"
    res = _run(str(trace), "--decisions-out", str(dec), "--plot", str(png))
    _one_line_error(res, 1, says)
    assert not dec.exists() and not png.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary files left either


def test_crlf_line_endings_give_the_same_figures(tmp_path: Path) -> None:
    lf = _write(tmp_path, "lf.csv", _trace(ROWS[:400]))
    crlf = _write(tmp_path, "crlf.csv", _trace(ROWS[:400]).replace("\n", "\r\n"))
    a, b = _run(str(lf), "--json"), _run(str(crlf), "--json")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.stdout) == json.loads(b.stdout)


TRACE_5MIN_START = "2000-01-01T00:00:00Z"


def _bad_args(tmp: Path) -> list[tuple[list[str], int, str]]:
    t = str(tmp / "t.csv")
    return [
        (["--start", "1999-12-01T00:00:00Z"], 2,
         "--start 1999-12-01T00:00:00Z: before the trace, which runs from 2000-01-01T00:00:00Z"),
        (["--start", "2000-02-01T00:00:00Z"], 2,
         "--start 2000-02-01T00:00:00Z: after the trace"),
        (["--start", "2000-01-02T00:10:00Z"], 2,
         "--start 2000-01-02T00:10:00Z: not on a cycle boundary (every 20m from "
         "2000-01-01T00:00:00Z): use 2000-01-02T00:00:00Z or 2000-01-02T00:20:00Z"),
        (["--start", TRACE_5MIN_START], 2,
         "--start 2000-01-01T00:00:00Z: leaves no history before the first decision"),
        (["--start", "2000-01-02T00:00:00"], 2, "--start: give a time zone"),
        (["--cycle", "25m", "--lead", "10m"], 2,
         "--cycle 25m is not a multiple of the trace step 10m"),
        (["--cycle", "30m", "--lead", "15m"], 2,
         "--lead 15m is not a multiple of the trace step 10m"),
        (["--lead", "20m"], 2, "--lead 20m must be shorter than --cycle 20m"),
        (["--target-availability", "1"], 2,
         "--target-availability: must be at least 0.5 and below 1, got 1"),
        (["--target-availability", "0.3"], 2,
         "--target-availability: must be at least 0.5 and below 1, got 0.3"),
        (["--capacity-per-worker", "inf"], 2,
         "--capacity-per-worker: must be a positive finite number, got inf"),
        (["--plot", str(tmp / "nope" / "p.png")], 2,
         f"--plot {tmp / 'nope' / 'p.png'}: folder {tmp / 'nope'} does not exist"),
        (["--plot", str(tmp / "afile" / "p.png")], 2,
         f"--plot {tmp / 'afile' / 'p.png'}: {tmp / 'afile'} is not a folder"),
        (["--plot", str(tmp / "p.csv")], 2, f"--plot {tmp / 'p.csv'}: cannot draw a '.csv' file"),
        (["--decisions-out", t], 2, f"--decisions-out {t}: is the trace file"),
        (["--plot", t], 2, f"--plot {t}: is the trace file"),
        (["--decisions-out", str(tmp / "o.png"), "--plot", str(tmp / "o.png")], 2,
         "--plot and --decisions-out are the same file"),
    ]  # fmt: skip


ARG_IDS = [
    "start-before", "start-after", "start-off-boundary", "start-no-history", "start-naive",
    "cycle-off-step", "lead-off-step", "lead-ge-cycle", "target-1", "target-0.3", "cap-inf",
    "plot-no-folder", "plot-folder-is-file", "plot-suffix", "decisions-is-trace",
    "plot-is-trace", "same-outputs",
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(ARG_IDS)), ids=ARG_IDS)
def test_bad_argument_is_one_line_and_writes_nothing(tmp_path: Path, case: int) -> None:
    # 3 days of 10-min steps: boundaries every 20 min from its first row
    trace = _write(tmp_path, "t.csv", _trace(ROWS[: 3 * 144]))
    _write(tmp_path, "afile", "not a folder")
    before = trace.read_bytes()
    args, code, says = _bad_args(tmp_path)[case]
    outs = {"--decisions-out": tmp_path / "d.csv", "--plot": tmp_path / "p.png"}
    extra = [x for opt, p in outs.items() if opt not in args for x in (opt, str(p))]
    res = _run(str(trace), *args, *extra)
    _one_line_error(res, code, says)
    assert trace.read_bytes() == before  # never overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "t.csv"]


@pytest.mark.skipif(not SCORER.exists(), reason="/work/shared (reference scorer) is absent")
@pytest.mark.parametrize("kind", ["mooncake-1min", "1min-gaps", "5min-offset-grid"])
def test_cli_figures_agree_with_the_reference_scorer(tmp_path: Path, kind: str) -> None:
    """The CLI's own output (--json, --decisions-out) against score.py on the same trace,
    also for 1- and 5-minute steps, a grid offset from the minute and gaps."""
    if kind == "mooncake-1min":
        trace = Path("/work/shared/traces/llm_kimi_mooncake_conversation_1min.csv")
    else:
        step = 1 if kind == "1min-gaps" else 5
        off = 0 if kind == "1min-gaps" else 137  # seconds: a grid not on the minute
        out = []
        for i, r in enumerate(ROWS[:200] if step == 1 else ROWS[:400]):
            n = int(r.split(",")[1])
            for k in range(10 // step):
                if (i * 7 + k) % 53 == 0:
                    continue  # a gap
                s = (i * 10 + k * step) * 60 + off
                t = f"2000-01-{1 + s // 86400:02d}T{s % 86400 // 3600:02d}:"
                t += f"{s % 3600 // 60:02d}:{s % 60:02d}Z"
                out.append(f"{t},{n // (10 // step) + (i * k) % 97}")
        trace = _write(tmp_path, f"{kind}.csv", _trace(out))
    dec = tmp_path / "d.csv"
    res = _run(str(trace), "--json", "--decisions-out", str(dec))
    assert res.exit_code == 0, res.output
    ours = json.loads(res.stdout)
    r = subprocess.run(
        [sys.executable, str(SCORER), str(trace), "--decisions", str(dec), "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    ref = json.loads(r.stdout)
    ours = {("candidate" if k == "nomadscale" else k): m for k, m in ours.items()}
    assert set(ours) == set(ref)
    for name, m in ref.items():
        for key in ("availability", "served", "worker_hours", "cost_vs_oracle"):
            assert ours[name][key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), (name, key)
