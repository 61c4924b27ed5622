"""``nomadscale capacity`` as a capacity planner meets it: every catalog mistake at once as
``file:line: field: message``, a ranked table whose costs add up by hand, and the argument
and trace mistakes of the backtest answered the same way."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nomadscale.cli.main import _register, cli

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "policies" / "catalog" / "gcp-gpu-shapes.yaml"
T0 = datetime(2026, 1, 5, tzinfo=UTC)


def _run(*args: str) -> Result:
    _register()
    return CliRunner().invoke(cli, ["capacity", *args])


def _flat_trace(tmp: Path, *, rpm: float, rows: int, step_min: int = 10) -> Path:
    p = tmp / "flat.csv"
    lines = ["timestamp,requests"]
    for i in range(rows):
        t = T0 + timedelta(minutes=step_min * i)
        lines.append(f"{t:%Y-%m-%dT%H:%M:%SZ},{rpm * step_min:g}")
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _line_of(text: str, needle: str, nth: int = 1) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[nth - 1]


def test_every_catalog_mistake_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    text = CATALOG.read_text(encoding="utf-8")
    for old, new in (
        ("price_per_hour: 0.71", "price_per_hour: 0"),  # zero price
        ("    vcpus: 8\n    ram_gb: 32\n", "    ram_gb: 32\n"),  # g2-standard-8 lost vcpus
        ("name: g2-standard-12", "name: g2-standard-4"),  # duplicate shape name
        ("rpm_per_worker: 110", "rpm_per_worker: fast"),
        ("gpu_memory_gb: 18   #", "gpu_memory_gb: 100   #"),  # more than any shape has
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    cat = tmp_path / "cat.yaml"
    cat.write_text(text, encoding="utf-8")
    res = _run("--catalog", str(cat), "--trace", str(_flat_trace(tmp_path, rpm=500, rows=20)))
    assert res.exit_code == 1, res.output
    assert res.stdout == "" and "Traceback" not in res.output
    c = str(cat)
    assert res.stderr.splitlines() == [
        f"error: {c}:{_line_of(text, 'gpu_memory_gb: 100')}: worker.gpu_memory_gb: 100 GB is "
        "more than any shape's GPUs hold for one worker (at most 80 GB, on a2-ultragpu-1g, "
        "a3-highgpu-1g)",
        f"error: {c}:{_line_of(text, 'price_per_hour: 0')}: shapes[0].price_per_hour: "
        "must be > 0.0, got 0",
        f"error: {c}:{_line_of(text, 'name: g2-standard-8')}: shapes[1].vcpus: required",
        f"error: {c}:{_line_of(text, 'name: g2-standard-4', 2)}: shapes[2].name: duplicate "
        "shape name 'g2-standard-4' (first at shapes[0])",
        f"error: {c}:{_line_of(text, 'rpm_per_worker: fast')}: shapes[4].rpm_per_worker: "
        "must be a number, got a string 'fast'",
    ]


def test_duplicate_key_and_syntax_errors_name_the_line(tmp_path: Path) -> None:
    text = CATALOG.read_text(encoding="utf-8")
    dup = text.replace("price_per_hour: 0.85\n", "price_per_hour: 0.85\n    price_per_hour: 0.1\n")
    cat = tmp_path / "cat.yaml"
    cat.write_text(dup, encoding="utf-8")
    trace = str(_flat_trace(tmp_path, rpm=500, rows=20))
    res = _run("--catalog", str(cat), "--trace", trace)
    assert res.exit_code == 1, res.output
    first = _line_of(dup, "price_per_hour: 0.85")
    assert res.stderr.splitlines() == [
        f"error: {cat}:{first + 1}: shapes[1].price_per_hour: duplicate key (first at line {first})"
    ]
    cat.write_text("", encoding="utf-8")
    res = _run("--catalog", str(cat), "--trace", trace)
    assert res.exit_code == 1 and res.stderr == f"error: {cat}: the file is empty\n"


def test_worker_memory_given_as_option_is_named_as_option(tmp_path: Path) -> None:
    trace = str(_flat_trace(tmp_path, rpm=500, rows=20))
    res = _run("--catalog", str(CATALOG), "--trace", trace, "--worker-gpu-memory", "100")
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [
        "error: --worker-gpu-memory 100: more than any shape's GPUs hold for one worker "
        "(at most 80 GB, on a2-ultragpu-1g, a3-highgpu-1g)"
    ]
    # the option also mends a catalog whose worker asks too much
    text = CATALOG.read_text(encoding="utf-8").replace(
        "gpu_memory_gb: 18   #", "gpu_memory_gb: 99 #"
    )
    cat = tmp_path / "cat.yaml"
    cat.write_text(text, encoding="utf-8")
    ok = _run("--catalog", str(cat), "--trace", trace, "--worker-gpu-memory", "18", "--json")
    assert ok.exit_code == 0, ok.output


def test_ranked_costs_add_up_by_hand_also_for_a_partial_last_cycle(tmp_path: Path) -> None:
    cat = tmp_path / "cat.yaml"
    cat.write_text(
        "worker: {gpus: 1, gpu_memory_gb: 10, vcpus: 2, ram_gb: 8}\n"
        "shapes:\n"
        "  - {name: a, gpus: 1, gpu_memory_gb: 24, vcpus: 4, ram_gb: 16,"
        " price_per_hour: 1.0, rpm_per_worker: 250}\n"
        "  - {name: b, gpus: 1, gpu_memory_gb: 24, vcpus: 4, ram_gb: 16,"
        " price_per_hour: 1.5, rpm_per_worker: 600}\n"
        "  - {name: c, gpus: 2, gpu_memory_gb: 24, vcpus: 8, ram_gb: 32,"
        " price_per_hour: 1.8, rpm_per_worker: 250}\n",
        encoding="utf-8",
    )
    # 500 req/min for 24h10m: 145 steps of 10 min, the last 20-min cycle half covered
    trace = _flat_trace(tmp_path, rpm=500, rows=145)
    res = _run("--catalog", str(cat), "--trace", str(trace), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["days"] == pytest.approx(145 / 144, abs=1e-3)
    rows = {s["shape"]: s for s in out["shapes"]}
    assert [s["shape"] for s in out["shapes"]] == ["b", "a", "c"]
    # b: 1 worker -> 1 VM; a: 2 workers -> 1 VM per zone; c: 2 workers, 1 per zone -> 2 VMs
    assert rows["b"]["cost_per_day"] == pytest.approx(1 * 1.5 * 24)
    assert rows["a"]["cost_per_day"] == pytest.approx(2 * 1.0 * 24)
    assert rows["c"]["cost_per_day"] == pytest.approx(2 * 1.8 * 24)
    assert rows["b"]["vm_hours"] == pytest.approx(145 / 6, abs=1e-3)  # not 146 steps


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--cycle", "25m"], 2, "--cycle 25m is not a multiple of the trace step 10m"),
        (["--cycle", "5m"], 2, "--cycle 5m is not a multiple of the trace step 10m"),
        (["--target-availability", "1"], 2, "--target-availability: must be between 0 and 1"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], code: int, says: str) -> None:
    trace = str(_flat_trace(tmp_path, rpm=500, rows=20))
    res = _run("--catalog", str(CATALOG), "--trace", trace, *args)
    assert res.exit_code == code, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("\ufefftimestamp,requests\n2026-01-05T00:00:00Z,1\n2026-01-05T00:10:00Z,1\n",
         "t.csv:1: starts with a byte-order mark"),
        ("timestamp,requests\n2026-01-05T00:00:00,1\n2026-01-05T00:10:00,1\n",
         "t.csv:2: timestamp '2026-01-05T00:00:00' has no time zone"),
        ("", "t.csv: the file is empty"),
    ],
)  # fmt: skip
def test_bad_trace_is_one_line(tmp_path: Path, text: str, says: str) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(text, encoding="utf-8")
    res = _run("--catalog", str(CATALOG), "--trace", str(trace))
    assert res.exit_code == 1, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr


def test_table_names_the_share_of_steps_served_availability(tmp_path: Path) -> None:
    """The last column is the share of demand steps the plan serves (``availability`` in the
    JSON and in the backtest), not the share of demand ("served" in the backtest)."""
    trace = str(_flat_trace(tmp_path, rpm=500, rows=20))
    res = _run("--catalog", str(CATALOG), "--trace", trace)
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if "shape" in line and "#" in line)
    assert header.split()[-2:] == ["availability", "┃"] and "served" not in header
