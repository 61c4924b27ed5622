"""``nomadscale simulate`` walked as a new user and a capacity planner would: every option,
the figures against the twin's own event log, the plot, progress, Ctrl-C and bad input."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from nomadscale.backtest.protocol import make_params
from nomadscale.cli.main import _register, cli
from nomadscale.config.policy import load_policy
from nomadscale.integrations.tracefile import load_trace_file
from nomadscale.service.simulate import default_policy, default_trace, simulate
from nomadscale.service.simulate_report import SimResult, figure

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KIMI = REPO / "tests" / "data" / "llm_kimi_mooncake_conversation_1min.csv"  # 58 1-min steps
ELB = REPO / "tests" / "data" / "web_aws_elb_requests_5min_head.csv"  # 100 h of 5-min steps

_register()


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(cli, ["simulate", *args])


def _policy_file(tmp_path: Path, doc: dict[str, Any], name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _default_doc() -> dict[str, Any]:
    doc = default_policy(default_trace()).to_yaml_dict()
    return json.loads(json.dumps(doc))  # plain data


# --- the default run: progress, figures, plot ---------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimResult, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    out = tmp_path_factory.mktemp("sim")
    res = simulate(days=0.1, out_dir=out, progress=lambda d, t: calls.append((d, t)))
    return res, calls


def test_progress_ends_at_its_total(short_run: tuple[SimResult, list[tuple[int, int]]]) -> None:
    """0.1 days = 144 minutes: cycles fire at +0, +20 ... +140 min, 8 of them; the bar
    said 8/7 (the total was the window // cycle)."""
    res, calls = short_run
    assert calls[-1] == (8, 8)
    assert res.cycles + res.missed == 8
    assert all(done <= total for done, total in calls)


def test_plot_is_labelled_in_utc_with_the_forecast_band(
    short_run: tuple[SimResult, list[tuple[int, int]]],
) -> None:
    res, _ = short_run
    fig = figure(res, rpm=100.0)
    try:
        top, bottom = fig.axes
        labels = [t.get_text() for t in top.get_legend().get_texts()]
        assert any(x.startswith("forecast") for x in labels), labels
        assert any(x.startswith("demand") for x in labels) and any(
            x.startswith("capacity") for x in labels
        )
        assert "UTC" in bottom.get_xlabel() and "UTC" in top.get_title()
        assert bottom.get_ylabel() == "running workers"
        lo, hi = bottom.get_xlim()  # the axis spans the simulated window, not the warm-up
        import matplotlib.dates as mdates

        assert mdates.num2date(lo) <= res.start and mdates.num2date(hi) >= res.end
        assert mdates.num2date(lo) > res.start - timedelta(hours=1)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert res.plot is not None and Path(res.plot).read_bytes()[:4] == b"\x89PNG"


# --- the figures against the twin's own event log -------------------------------------------


def _read_rpm(path: Path) -> tuple[datetime, float, dict[datetime, float]]:
    with path.open() as f:
        rows = [(datetime.fromisoformat(r["timestamp"]), float(r["requests"])) for r in
                csv.DictReader(f)]  # fmt: skip
    step = min((b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(rows))
    return rows[0][0], step, {t: n * 60.0 / step for t, n in rows}


def _replay(events: list[dict[str, Any]], job: str) -> tuple[list[float], list[int], list[int]]:
    """(time, running workers, live nodes) after every event, from the twin's log alone."""
    running: set[str] = set()
    nodes: set[str] = set()
    t: list[float] = []
    w: list[int] = []
    n: list[int] = []
    for ev in events:
        kind = ev["type"]
        if kind == "alloc_running" and ev.get("job_id") == job:
            running.add(ev["alloc_id"])
        elif kind in ("alloc_stopping", "alloc_stopped", "alloc_failed", "alloc_lost"):
            running.discard(ev["alloc_id"])
        elif kind == "node_added":
            nodes.add(ev["node_id"])
        elif (kind == "node_status" and ev["status"] == "down") or kind == "node_removed":
            nodes.discard(ev["node_id"])
        else:
            continue
        at = ev["time"].timestamp()
        if t and t[-1] == at:
            w[-1], n[-1] = len(running), len(nodes)
        else:
            t.append(at)
            w.append(len(running))
            n.append(len(nodes))
    return t, w, n


def _value_at(t: list[float], v: list[int], at: float) -> int:
    i = max(j for j in range(len(t)) if t[j] <= at)
    return v[i]


def test_figures_match_the_twins_event_log() -> None:
    """Availability and hours recomputed from the twin's event log: a step counts as served
    when the workers running at EVERY instant of it cover its demand, hours integrate what
    ran (booting nodes included). The summary sampled the fleet once per step, at its start,
    before the cycle firing then stopped workers: here 1243.2 worker-hours where the log
    says 1241.5; on the whole ELB trace, availability 98.95% where the log says 98.61%."""
    trace = ELB
    res = simulate(trace=trace, days=2)
    rpm = default_policy(trace).capacity.rpm_per_worker
    t, w, n = _replay(res.events, "ml-worker")
    a, b = res.start.timestamp(), res.end.timestamp()

    def integral(v: list[int]) -> float:
        edges = [a] + [x for x in t if a < x < b] + [b]
        spans = itertools.pairwise(edges)
        return sum(_value_at(t, v, lo) * (hi - lo) for lo, hi in spans) / 3600

    first, step, demand = _read_rpm(trace)
    k = math.ceil((res.start - first).total_seconds() / step)
    served = total = 0
    at = first + timedelta(seconds=k * step)
    while at < res.end:
        s, e = at.timestamp(), min(at.timestamp() + step, b)
        if at in demand:  # absent rows are gaps, not zeros
            low = min([_value_at(t, w, s)] + [w[i] for i in range(len(t)) if s < t[i] < e])
            total += 1
            served += low * rpm >= demand[at]
        at += timedelta(seconds=step)
    s = res.summary()
    assert s["availability"] == round(served / total, 4)
    assert s["worker_hours"] == pytest.approx(integral(w), abs=0.1)
    assert s["node_hours"] == pytest.approx(integral(n), abs=0.1)
    assert res.node_hours is not None and res.node_hours > res.worker_hours  # boots are paid


# --- options ------------------------------------------------------------------------------


def test_short_trace_starts_where_backtest_starts_and_says_it_ends(tmp_path: Path) -> None:
    """A 58-minute 1-min trace: the warm-up is 35% of 58 steps = 20 steps, one 20-min cycle
    (backtest's first decision at 00:20); simulate started at 00:40 (35% of the seconds,
    20.3 min, rounded up to two cycles). And --days beyond the trace was silent."""
    trace = KIMI
    res = _run(["--trace", str(trace), "--days", "1", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    p = make_params(load_trace_file(trace))
    assert s["start"] == p.time_of(int(p.boundaries[0])).isoformat() == "2000-01-01T00:20:00+00:00"
    assert s["days_asked"] == 1.0 and s["days"] <= 0.03
    assert any("simulated 0.03 of the 1 days asked" in n for n in s["notes"]), s["notes"]
    text = _run(["--trace", str(trace), "--days", "1", "--out", str(tmp_path)])
    assert text.exit_code == 0
    assert "note          the trace ends 0.03 days (0.6 h) after the first decision" in text.stdout


def test_initial_fleet_within_the_policys_bounds(tmp_path: Path) -> None:
    """The shipped eKYC policy (240 rpm/worker, max 40) on the bundled trace (about 94,000
    rpm): the twin started with ceil(demand / 240) = 319 workers, eight times bounds.max,
    and the summary said nothing about demand the policy can never serve."""
    res = _run(["--policy", str(REPO / "policies" / "ekyc-ml.yaml"), "--days", "0.1", "--out",
                str(tmp_path), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["peak_workers"] <= 40
    assert any("not its Prometheus query" in n for n in s["notes"])
    assert any("above bounds.max 40" in n for n in s["notes"])


def test_workers_per_node_share_nodes(tmp_path: Path) -> None:
    """workers_per_node: 2 means two GPUs a node: half the nodes, the same service. The
    twin's nodes had one GPU, so every other worker stayed unplaced (availability ~85%) and
    node-hours equalled worker-hours; the static baseline counted workers as nodes."""
    doc = _default_doc()
    doc["target"]["node_pool"]["workers_per_node"] = 2
    path = _policy_file(tmp_path, doc)
    res = _run(["--policy", str(path), "--days", "0.5", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["availability"] >= 0.95
    assert s["node_hours"] < 0.6 * s["worker_hours"]
    per_zone = [math.ceil(s["static_peak_workers"] / 2), s["static_peak_workers"] // 2]
    nodes = sum(math.ceil(z / 2) for z in per_zone)
    assert s["static_peak_node_hours"] == pytest.approx(nodes * s["days"] * 24, rel=0.01)


def test_policy_without_a_node_pool_scales_the_groups(tmp_path: Path) -> None:
    """No target.node_pool: nomadscale scales the task groups on nodes it does not manage.
    The twin had only the initial fleet's nodes, so the fleet could never grow (peak 3
    workers, availability 43%) and the summary reported 0 node-hours, 0% of static."""
    doc = _default_doc()
    del doc["target"]["node_pool"]
    for z in doc["zones"]["list"]:
        z.pop("instance_group", None)
    path = _policy_file(tmp_path, doc)
    res = _run(["--policy", str(path), "--days", "0.5", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["availability"] >= 0.95 and s["peak_workers"] > 20
    assert s["node_hours"] is None and s["static_peak_node_hours"] is None
    assert (
        0
        < s["cost_vs_static_peak"]
        == pytest.approx(s["worker_hours"] / s["static_peak_worker_hours"], abs=0.001)
    )
    assert any("no target.node_pool" in n for n in s["notes"])


@pytest.mark.consul
def test_consul_reruns_lead_and_release_the_lock(tmp_path: Path, consul_agent: Any) -> None:
    """Two runs in a row against one Consul: the first left its session holding
    nomadscale-sim/leader (30 s TTL, 15 s lock delay), so the second skipped every cycle as
    not-leader and reported availability 60% as a result, exit 0."""
    addr = consul_agent.addr
    runs = []
    for _ in range(2):
        res = _run(["--consul", addr, "--days", "0.1", "--out", str(tmp_path), "--json"])
        assert res.exit_code == 0, res.output
        runs.append(json.loads(res.output))
    assert [s["skipped"] for s in runs] == [{}, {}]
    assert all(s["applied"] > 0 for s in runs)
    prefixes = []
    for s in runs:
        note = next(n for n in s["notes"] if n.startswith("decision records in Consul"))
        prefixes.append(note.rsplit(" ", 1)[-1])
    assert prefixes[0] != prefixes[1]
    for prefix in prefixes:
        with urllib.request.urlopen(f"{addr}/v1/kv/{prefix}leader", timeout=5) as r:
            entry = json.loads(r.read())[0]
        assert not entry.get("Session")  # released: nobody waits for a TTL
        with urllib.request.urlopen(f"{addr}/v1/kv/{prefix}decisions/?keys", timeout=5) as r:
            assert len(json.loads(r.read())) == 8  # the records are there to inspect
        req = urllib.request.Request(f"{addr}/v1/kv/{prefix}?recurse", method="DELETE")
        urllib.request.urlopen(req, timeout=5).close()


# --- output, progress, Ctrl-C, mistakes ------------------------------------------------------


def test_help_documents_every_json_field_and_the_exit_codes(tmp_path: Path) -> None:
    help_text = _run(["--help"]).output
    res = _run(["--trace", str(KIMI), "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)  # nothing else on stdout
    missing = [k for k in s if k not in help_text]
    assert not missing, missing
    assert "Exit status: 0 done; 1" in help_text and "130 interrupted" in help_text
    assert res.stderr == ""  # no progress with --json


def test_progress_on_a_pipe_is_plain_lines(tmp_path: Path) -> None:
    """stderr that is no terminal (a pipe, CI): a line per quarter, not a bar's control
    characters frozen at the end."""
    res = _run(["--trace", str(KIMI), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "━" not in res.stderr
    assert res.stderr.splitlines()[-1].startswith("simulate: 2/2 cycles (100%)")


@pytest.mark.parametrize("days", ["nan", "inf"])
def test_bad_days_is_one_line(days: str, tmp_path: Path) -> None:
    """nan and inf passed click's FloatRange(min=0.1) and ended in a traceback from
    timedelta."""
    res = _run(["--days", days, "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [f"error: --days {days}: must be a positive number of days"]
    assert res.stdout == ""


def test_many_more_days_than_the_trace(tmp_path: Path) -> None:
    """1e9 days overflowed timedelta (a traceback): the window ends with the trace."""
    res = _run(["--trace", str(KIMI), "--days", "1e9", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["days"] <= 0.03


def test_ctrl_c_stops_with_one_line(tmp_path: Path) -> None:
    """SIGINT mid-run: one line saying how far it got and that nothing was written, exit
    130; it printed click's bare "Aborted!" and exited 1."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    code = "from nomadscale.cli.main import main; main()"
    p = subprocess.Popen([sys.executable, "-c", code, "simulate", "--days", "3", "--out",
                          str(tmp_path / "out")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert p.stderr is not None
        first = p.stderr.readline()  # the first quarter's progress line
        assert first.startswith("simulate: "), first
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert time.monotonic() - sent < 10
    assert p.returncode == 130
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simulate: interrupted after "), err
    assert "no summary, no plot" in lines[0]
    assert not list((tmp_path / "out").glob("*.png"))


def test_hand_made_policy_with_three_schedules_and_overnight_business_hours(
    tmp_path: Path,
) -> None:
    """A policy unlike the default: its own zones, MIGs, job and namespace, 15-min cycles on
    a 5-min trace, business hours across midnight, min/max/fixed schedule windows."""
    doc = {
        "name": "chat-gpu", "cycle": "15m", "lead_time": "5m",
        "demand": {"source": "trace", "trace": str(ELB), "step": "5m"},
        "forecast": {"target_availability": 0.98, "business_hours": {
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "22:00",
            "end": "06:00", "timezone": "UTC", "target_availability": 0.995,
            "min_workers": 6}},
        "capacity": {"rpm_per_worker": 4},
        "bounds": {"min": 1, "max": 60, "max_step_up": 10, "max_step_down": 5,
                   "scale_down_cooldown": "30m"},
        "zones": {"list": [
            {"name": "us-east1-b", "group": "chat-b", "node_pool": "a100",
             "instance_group": "chat-mig-b"},
            {"name": "us-east1-c", "group": "chat-c", "node_pool": "a100",
             "instance_group": "chat-mig-c"}]},
        "target": {"job": "chat-inference", "namespace": "llm",
                   "node_pool": {"provider": "gce-mig", "project": "chat-prod"}},
        "schedules": [
            {"name": "night", "cron": "0 1 * * *", "duration": "3h", "min": 20},
            {"name": "cap", "cron": "0 15 * * *", "duration": "1h", "max": 3},
        ],
    }  # fmt: skip
    path = _policy_file(tmp_path, doc)
    pol = load_policy(path)
    res = simulate(policy=pol, days=1, out_dir=tmp_path)
    assert res.cycles + res.missed == 96 and res.failed == 0
    assert res.trace == str(ELB) and res.notes == []
    tl = res.timeline
    assert tl is not None and tl.zones == ("us-east1-b", "us-east1-c")

    def at(h: int, m: int) -> int:
        when = res.start.replace(hour=h, minute=m, second=0) + timedelta(days=1)
        if when >= res.end:
            when -= timedelta(days=1)
        i = max(j for j in range(len(tl.t)) if tl.t[j] <= when.timestamp())
        return sum(tl.running[i])

    assert at(2, 0) >= 20  # the night window's min, placed in time
    assert at(15, 30) <= 3  # the cap window
    assert Path(res.plot or "").name == "simulate-chat-gpu.png"
