"""``nomadscale capacity``: which GPU VM shape serves a demand profile for the least money.

    nomadscale capacity --catalog policies/catalog/gcp-gpu-shapes.yaml --trace demand.csv
    nomadscale capacity --catalog ... --policy policies/ekyc-ml.yaml --json

The demand profile is a trace CSV (``timestamp,requests``) or the trace a policy's
``demand:`` points at. Method: see ``nomadscale.stages.capacity``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from nomadscale.config.validate import field_path
from nomadscale.config.yamlpos import YamlSyntaxError, load_yaml
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import ConfigError, InputError, UsageError
from nomadscale.core.files import read_small_text
from nomadscale.stages.capacity import (
    CapacityPlan,
    Catalog,
    WorkerNeeds,
    catalog_problems,
    memory_shortfall,
    parse_catalog,
    plan_capacity,
)

MAX_CATALOG_BYTES = 1024 * 1024  # a catalog is a few kB; a larger file is a mistake


def load_catalog(path: str | Path, *, check_worker: bool = True) -> Catalog:
    """Read and validate a catalog; ConfigError with every problem as ``file:line: field:
    message`` (``check_worker=False`` when options replace the catalog's worker needs)."""
    p = Path(path)
    try:
        text = read_small_text(p, limit=MAX_CATALOG_BYTES)
    except FileNotFoundError:
        raise UsageError(f"--catalog: no such file: {p}") from None
    except IsADirectoryError:
        raise UsageError(f"--catalog: {p} is a folder, expected a catalog file") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a UTF-8 text file") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = load_yaml(text)
    except YamlSyntaxError as e:
        where = f"{p}:{e.line}" if e.line else str(p)
        raise InputError(f"{where}: not valid YAML: {e.message}") from None
    if doc.data is None:
        raise InputError(f"{p}: the file is empty")
    problems = [
        (line, f"{p}:{line}: {field_path(loc)}: duplicate key (first at line {first})")
        for loc, line, first in doc.duplicates
    ]
    for loc, message in catalog_problems(doc.data, check_worker=check_worker):
        line = doc.line_of(loc)
        problems.append((line, f"{p}:{line}: {field_path(loc) if loc else 'catalog'}: {message}"))
    if problems:
        errors = [line_text for _, line_text in sorted(problems, key=lambda lp: lp[0])]
        raise ConfigError(errors[0], errors=errors)
    return parse_catalog(doc.data, where=str(p))


_WORKER_OPTIONS = {
    "gpus": "--worker-gpus",
    "gpu_memory_gb": "--worker-gpu-memory",
    "vcpus": "--worker-vcpus",
    "ram_gb": "--worker-ram",
}


def _worker(catalog: Catalog, overrides: dict[str, Any]) -> WorkerNeeds:
    given = {k: v for k, v in overrides.items() if v is not None}
    base = catalog.worker.model_dump() if catalog.worker else {}
    if not base and not given:
        raise UsageError(
            "worker needs are missing: add 'worker:' to the catalog or pass --worker-gpus, "
            "--worker-gpu-memory, --worker-vcpus, --worker-ram"
        )
    for key, value in given.items():
        if not math.isfinite(value):
            raise UsageError(f"{_WORKER_OPTIONS[key]}: must be a finite number, got {value:g}")
    try:
        worker = WorkerNeeds.model_validate({**base, **given})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        what = f"{err['msg'].removeprefix('Input should be ')}, got {err.get('input')!r}"
        where = _WORKER_OPTIONS.get(key, key) if key in given else f"catalog worker.{key}"
        raise UsageError(f"{where}: must be {what}") from None
    short = memory_shortfall(catalog.shapes, worker)
    if short:  # the options made it so (the catalog's own worker was checked with the file)
        if "gpu_memory_gb" in given:
            raise UsageError(f"--worker-gpu-memory {worker.gpu_memory_gb:g}: {short}")
        raise UsageError(
            f"--worker-gpus {worker.gpus}: the catalog's worker.gpu_memory_gb "
            f"{worker.gpu_memory_gb:g} GB is {short}"
        )
    return worker


def _fmt_money(x: float, currency: str) -> str:
    sym = "$" if currency == "USD" else f"{currency} "
    return f"{sym}{x:,.2f}"


def render(plan: CapacityPlan, *, console: Console) -> None:
    cur = plan.currency
    title = (
        f"Capacity plan: {plan.days:.1f} days of demand, {format_duration(plan.cycle_s)} "
        f"cycles, target {plan.target:g}, {plan.zones} zones"
    )
    table = Table(title=title, title_justify="left")
    for col, just in (
        ("#", "right"),
        ("shape", "left"),
        ("gpu", "left"),
        ("workers/VM", "right"),
        ("rpm/worker", "right"),
        ("avg VMs", "right"),
        ("peak VMs", "right"),
        ("price/h", "right"),
        ("cost/day", "right"),
        ("cost/30d", "right"),
        ("availability", "right"),
    ):
        table.add_column(col, justify=just, no_wrap=True, min_width=len(col))  # type: ignore[arg-type]
    unusable = Table(title="Unusable shapes", title_justify="left")
    for col in ("shape", "gpu", "price/h", "reason"):
        unusable.add_column(col, no_wrap=col != "reason")
    rank = 0
    for p in plan.plans:
        s = p.shape
        if not p.usable:
            unusable.add_row(s.name, s.gpu, _fmt_money(s.price_per_hour, cur), p.reason)
            continue
        rank += 1
        table.add_row(
            str(rank),
            s.name,
            s.gpu,
            f"{p.fit.workers} ({p.fit.limit})",
            f"{s.rpm_per_worker:g}",
            f"{p.avg_vms:.1f}",
            str(p.peak_vms),
            _fmt_money(s.price_per_hour, cur),
            _fmt_money(p.cost_per_day, cur),
            _fmt_money(p.cost_per_month, cur),
            f"{p.availability * 100:.2f}%",
        )
    console.print(table)
    if unusable.row_count:
        console.print(unusable)
    console.print(f"method: {plan.method}", soft_wrap=True, highlight=False)
    if plan.prices_note:
        console.print(f"prices: {plan.prices_note}", soft_wrap=True, highlight=False)


@click.command("capacity")
@click.option(
    "--catalog",
    "catalog_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="YAML catalog of VM shapes (see policies/catalog/gcp-gpu-shapes.yaml).",
)
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False),
    help="Demand profile: CSV timestamp,requests.",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False),
    help="Take the demand trace, cycle, zones, target and bounds.min from a policy.",
)
@click.option(
    "--target-availability",
    type=float,
    default=None,
    help="Share of demand steps to serve (default: the policy's, else 0.99).",
)
@click.option("--cycle", default=None, help="Decision cycle (default: the policy's, else 20m).")
@click.option("--zones", type=int, default=None, help="Zones to split over (default 2).")
@click.option("--worker-gpus", type=int, default=None, help="GPUs one worker needs.")
@click.option("--worker-gpu-memory", type=float, default=None, help="GPU memory (GB) per worker.")
@click.option("--worker-vcpus", type=float, default=None, help="vCPUs one worker needs.")
@click.option("--worker-ram", type=float, default=None, help="RAM (GB) one worker needs.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def capacity(
    *,
    catalog_path: str,
    trace_path: str | None,
    policy_path: str | None,
    target_availability: float | None,
    cycle: str | None,
    zones: int | None,
    worker_gpus: int | None,
    worker_gpu_memory: float | None,
    worker_vcpus: float | None,
    worker_ram: float | None,
    as_json: bool,
) -> None:
    """Rank GPU VM shapes by the cost of serving a demand profile (cheapest first)."""
    from nomadscale.integrations.tracefile import load_trace_file

    if (trace_path is None) == (policy_path is None):
        raise UsageError("give exactly one of --trace CSV or --policy FILE")
    needs = {
        "gpus": worker_gpus,
        "gpu_memory_gb": worker_gpu_memory,
        "vcpus": worker_vcpus,
        "ram_gb": worker_ram,
    }
    overridden = worker_gpus is not None or worker_gpu_memory is not None
    catalog = load_catalog(catalog_path, check_worker=not overridden)
    worker = _worker(catalog, needs)
    cycle_s, n_zones, target, min_workers = 1200.0, 2, 0.99, 0
    if policy_path is not None:
        from nomadscale.config.policy import load_policy

        if not Path(policy_path).is_file():
            raise UsageError(f"--policy: no such file: {policy_path}")
        pol = load_policy(policy_path)
        if pol.demand.source != "trace":
            raise UsageError(
                f"--policy: {pol.name} reads demand from {pol.demand.source}; "
                "export a trace and pass --trace CSV"
            )
        trace_path = pol.demand.trace
        cycle_s = pol.cycle_s
        n_zones = len(pol.zones.items)
        target = pol.forecast.target_availability
        min_workers = pol.bounds.min
    cycle_from = f"the policy's cycle {format_duration(cycle_s)}" if policy_path else ""
    if cycle is not None:
        cycle_from = f"--cycle {cycle.strip()}"
        if cycle.strip().replace(".", "", 1).isdigit():
            raise UsageError(f"--cycle: {cycle!r} has no unit (write e.g. {cycle.strip()}m)")
        try:
            cycle_s = parse_duration(cycle).total_seconds()
        except ValueError as e:
            raise UsageError(f"--cycle: {e}") from None
        if cycle_s <= 0:
            raise UsageError("--cycle: must be longer than 0s")
    if zones is not None:
        if zones < 1:
            raise UsageError(f"--zones: must be at least 1, got {zones}")
        n_zones = zones
    if target_availability is not None:
        if not 0 < target_availability < 1:
            raise UsageError(
                f"--target-availability: must be between 0 and 1, got {target_availability:g}"
            )
        target = target_availability
    assert trace_path is not None
    if not Path(trace_path).is_file():
        raise UsageError(f"--trace: no such file: {trace_path}")
    series = load_trace_file(trace_path).series
    per = cycle_s / series.step_s
    if per < 1 - 1e-9 or abs(per - round(per)) > 1e-9:
        raise UsageError(
            f"{cycle_from or '--cycle ' + format_duration(cycle_s) + ' (default)'} is not a "
            f"multiple of the trace step {format_duration(series.step_s)} ({trace_path})"
        )
    plan = plan_capacity(
        catalog,
        series,
        worker=worker,
        cycle_s=cycle_s,
        target=target,
        zones=n_zones,
        min_workers=min_workers,
    )
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        render(plan, console=Console(width=max(Console().width, 150)))
    if not any(p.usable for p in plan.plans):
        click.echo("error: no shape in the catalog fits one worker (see the reasons)", err=True)
        raise SystemExit(1)
