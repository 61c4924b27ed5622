"""Capacity planning: workers per VM, the oracle plan, and the `capacity` command."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from nomadscale.cli.cmd_capacity import capacity
from nomadscale.core.errors import InputError
from nomadscale.core.ports import DemandSeries
from nomadscale.stages.capacity import (
    Reserved,
    Shape,
    WorkerNeeds,
    parse_catalog,
    plan_capacity,
    vms_for,
    workers_per_cycle,
    workers_per_vm,
)

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "policies" / "catalog" / "gcp-gpu-shapes.yaml"
T0 = datetime(2026, 11, 2, tzinfo=UTC)
WORKER = WorkerNeeds(gpus=1, gpu_memory_gb=18, vcpus=3, ram_gb=12)


def shape(**kw):
    base = dict(
        name="s",
        gpus=1,
        gpu_memory_gb=24,
        vcpus=8,
        ram_gb=32,
        price_per_hour=1.0,
        rpm_per_worker=240,
    )
    return Shape(**{**base, **kw})


def series(values, step_s=60):
    return DemandSeries(start=T0, step_s=step_s, values=np.asarray(values, dtype=float))


# --- fit -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "workers", "limit"),
    [
        ({}, 1, "gpus"),
        ({"gpus": 4, "vcpus": 48, "ram_gb": 192}, 4, "gpus"),
        ({"gpus": 4, "vcpus": 8, "ram_gb": 192}, 2, "vcpus"),  # 7.5 usable vCPU / 3
        ({"gpus": 4, "vcpus": 48, "ram_gb": 30}, 2, "ram"),  # 28.5 GB / 12
    ],
)
def test_workers_per_vm_is_the_tightest_resource(kw, workers, limit):
    fit = workers_per_vm(shape(**kw), WORKER, reserved=Reserved(vcpus=0.5, ram_gb=1.5))
    assert (fit.workers, fit.limit, fit.reason) == (workers, limit, "")


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"gpu_memory_gb": 16}, "16 GB GPU memory per worker, a worker needs 18 GB"),
        ({"gpus": 0}, "has 0 GPU(s), a worker needs 1"),
        ({"vcpus": 3}, "2.5 vCPUs left after reservation, a worker needs 3"),
        ({"ram_gb": 12}, "10.5 GB RAM left after reservation, a worker needs 12"),
    ],
)
def test_shape_that_cannot_host_a_worker_says_why(kw, reason):
    fit = workers_per_vm(shape(**kw), WORKER, reserved=Reserved(vcpus=0.5, ram_gb=1.5))
    assert fit.workers == 0
    assert fit.reason == reason


def test_two_gpu_worker_uses_memory_of_both_gpus():
    w = WorkerNeeds(gpus=2, gpu_memory_gb=40, vcpus=4, ram_gb=16)
    assert workers_per_vm(shape(gpus=4, vcpus=32, ram_gb=128), w).workers == 2
    assert workers_per_vm(shape(gpus=4, gpu_memory_gb=16, vcpus=32, ram_gb=128), w).workers == 0


# --- oracle plan ---------------------------------------------------------------------------


def test_each_cycle_is_sized_for_its_target_quantile_minute():
    # two 20-step cycles: one with a single spike, one flat
    c1 = [100.0] * 19 + [1000.0]
    c2 = [480.0] * 20
    w, demand = workers_per_cycle(series(c1 + c2), cycle_s=1200, rpm_per_worker=240, target=0.9)
    assert demand.tolist() == [100.0, 480.0]  # 0.9 tolerates the one spike minute in 20
    assert w.tolist() == [1, 2]
    w, _ = workers_per_cycle(series(c1 + c2), cycle_s=1200, rpm_per_worker=240, target=0.99)
    assert w.tolist() == [5, 2]


def test_gap_cycles_repeat_the_previous_size_and_min_is_a_floor():
    v = [np.nan] * 20 + [480.0] * 20 + [np.nan] * 20 + [10.0] * 20
    w, _ = workers_per_cycle(
        series(v), cycle_s=1200, rpm_per_worker=240, target=0.99, min_workers=1
    )
    assert w.tolist() == [2, 2, 2, 1]
    with pytest.raises(InputError, match="no data"):
        workers_per_cycle(series([np.nan] * 5), cycle_s=1200, rpm_per_worker=240, target=0.99)


def test_vms_round_up_per_zone():
    # 3 workers, 2 per VM, 2 zones: 2 + 1 -> 1 VM + 1 VM; 5 -> 3 + 2 -> 2 VMs + 1 VM
    assert vms_for(np.array([0, 1, 2, 3, 5]), per_vm=2, zones=2).tolist() == [0, 1, 2, 2, 3]
    assert vms_for(np.array([5]), per_vm=4, zones=1).tolist() == [2]


def test_plan_ranks_cheapest_first_and_lists_unusable_last():
    cat = parse_catalog(
        {
            "worker": WORKER.model_dump(),
            "shapes": [
                {
                    "name": "big",
                    "gpus": 2,
                    "gpu_memory_gb": 24,
                    "vcpus": 24,
                    "ram_gb": 96,
                    "price_per_hour": 1.8,
                    "rpm_per_worker": 240,
                },
                {
                    "name": "small",
                    "gpus": 1,
                    "gpu_memory_gb": 24,
                    "vcpus": 8,
                    "ram_gb": 32,
                    "price_per_hour": 1.0,
                    "rpm_per_worker": 240,
                },
                {
                    "name": "t4",
                    "gpus": 1,
                    "gpu_memory_gb": 16,
                    "vcpus": 8,
                    "ram_gb": 30,
                    "price_per_hour": 0.5,
                    "rpm_per_worker": 110,
                },
                {
                    "name": "unmeasured",
                    "gpus": 1,
                    "gpu_memory_gb": 24,
                    "vcpus": 8,
                    "ram_gb": 32,
                    "price_per_hour": 0.1,
                },
            ],
        }
    )
    # one day: 960 rpm -> 4 workers -> 2 per zone
    plan = plan_capacity(cat, series([960.0] * 1440), cycle_s=1200, target=0.99, zones=2)
    names = [p.shape.name for p in plan.plans]
    assert names == ["big", "small", "t4", "unmeasured"]
    big, small, t4, unmeasured = plan.plans
    assert (big.peak_vms, small.peak_vms) == (2, 4)
    assert big.cost_per_day == pytest.approx(2 * 1.8 * 24)
    assert small.cost_per_day == pytest.approx(4 * 1.0 * 24)
    assert small.cost_per_month == pytest.approx(small.cost_per_day * 30)
    assert big.availability == 1.0
    assert not t4.usable and "GPU memory" in t4.reason
    assert not unmeasured.usable and unmeasured.reason == "no measured rpm_per_worker"
    assert plan.days == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        ([], "expected a mapping"),
        ({"shapes": []}, "shapes"),
        ({"shapes": [{"name": "x"}]}, r"shapes\.0\.gpus"),
        (
            {
                "shapes": [
                    {
                        "name": "x",
                        "gpus": 1,
                        "gpu_memory_gb": 1,
                        "vcpus": 1,
                        "ram_gb": 1,
                        "price_per_hour": -1,
                    }
                ]
            },
            "price_per_hour",
        ),
        (
            {
                "shapes": [
                    {
                        "name": "x",
                        "gpus": 1,
                        "gpu_memory_gb": 1,
                        "vcpus": 1,
                        "ram_gb": 1,
                        "price_per_hour": 1,
                    }
                ]
                * 2
            },
            "duplicate shape name 'x'",
        ),
        (
            {
                "shapes": [
                    {
                        "name": "x",
                        "gpus": 1,
                        "gpu_memory_gb": 1,
                        "vcpus": 1,
                        "ram_gb": 1,
                        "price_per_hour": 1,
                    }
                ],
                "discount": 1,
            },
            "discount: Extra inputs",
        ),
    ],
)
def test_bad_catalog_is_a_one_line_input_error(data, msg):
    with pytest.raises(InputError, match=msg) as e:
        parse_catalog(data, where="cat.yaml")
    assert str(e.value).startswith("cat.yaml")
    assert "\n" not in str(e.value)


def test_shipped_catalog_is_valid_and_labels_prices_as_examples():
    text = CATALOG.read_text()
    assert "EXAMPLE LIST PRICES" in text
    cat = parse_catalog(yaml.safe_load(text), where=str(CATALOG))
    names = {s.name for s in cat.shapes}
    assert {
        "g2-standard-4",
        "g2-standard-24",
        "a2-highgpu-1g",
        "a2-ultragpu-1g",
        "a3-highgpu-1g",
    } <= names
    assert "check your region" in cat.prices_note


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "demand.csv"
    rows = ["timestamp,requests"]
    for i in range(3 * 1440):
        t = T0 + timedelta(minutes=i)
        rpm = 1500 + 1200 * np.sin(2 * np.pi * i / 1440)
        rows.append(f"{t.isoformat().replace('+00:00', 'Z')},{rpm:.0f}")
    p.write_text("\n".join(rows) + "\n")
    return p


def test_capacity_command_prints_a_ranked_table(trace):
    r = CliRunner().invoke(capacity, ["--catalog", str(CATALOG), "--trace", str(trace)])
    assert r.exit_code == 0, r.output
    assert "3.0 days of demand" in r.output
    assert "Unusable shapes" in r.output and "n1-standard-8-t4" in r.output
    assert "check your region's pricing" in r.output
    first = next(line for line in r.output.splitlines() if line.startswith("│ 1 "))
    assert "g2-standard-4" in first


def test_capacity_json_matches_the_plan(trace):
    r = CliRunner().invoke(
        capacity,
        [
            "--catalog",
            str(CATALOG),
            "--trace",
            str(trace),
            "--json",
            "--target-availability",
            "0.95",
            "--worker-gpu-memory",
            "10",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["target_availability"] == 0.95
    usable = [s for s in out["shapes"] if s["usable"]]
    costs = [s["cost"] for s in usable]
    assert costs == sorted(costs)
    assert any(s["shape"] == "n1-standard-8-t4" for s in usable)  # 10 GB fits a T4 now
    assert all(s["availability"] >= 0.95 for s in usable)


def test_capacity_from_a_policy_with_a_trace_source(tmp_path, trace):
    pol = yaml.safe_load((ROOT / "policies" / "ekyc-ml.yaml").read_text())
    pol["demand"] = {"source": "trace", "trace": trace.name}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pol))
    r = CliRunner().invoke(
        capacity, ["--catalog", str(CATALOG), "--policy", str(tmp_path / "p.yaml"), "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["target_availability"] == 0.99 and out["zones"] == 2


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        ([], "exactly one of --trace"),
        (["--trace", "nope.csv"], "--trace: no such file"),
        (["--policy", str(ROOT / "policies" / "ekyc-ml.yaml")], "reads demand from prometheus"),
        (["--trace", "x", "--target-availability", "1.5"], "between 0 and 1"),
    ],
)
def test_capacity_usage_errors_are_one_line(args, msg):
    from nomadscale.core.errors import UsageError

    r = CliRunner().invoke(capacity, ["--catalog", str(CATALOG), *args])
    assert isinstance(r.exception, UsageError)
    assert msg in str(r.exception)
