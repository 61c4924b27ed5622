"""The Grafana dashboard queries only metrics nomadscale really exports, and shows all of them.

Exported names come from two places: the service's own registry after a cycle, a runbook run
and a rollout are recorded (``service.records.Metrics`` with the healing engine's runbook
metrics and ``service.ops_metrics.DeployCollector`` over a KV holding a rollout record,
scraped as Prometheus would), and every prometheus_client metric constructed anywhere in
``nomadscale/`` (found in the source, so a metric another module adds is known here at once,
with the suffixes prometheus_client gives it). Every panel's queries must use metrics of the
scrape itself."""

from __future__ import annotations

import ast
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from nomadscale.deploy.state import RolloutState, StateStore
from nomadscale.healing.engine import DEFAULT_METRICS
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.service.ops_metrics import DeployCollector
from nomadscale.service.records import CycleRecord, Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "nomadscale.json"
METRIC = re.compile(r"\bnomadscale_[A-Za-z0-9_:]+")
SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
    "GaugeMetricFamily": ("",),
    "CounterMetricFamily": ("_total", "_created"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count", "_created"),
}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard (panel targets and template variables)."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, str | dict):
                out += [v] if isinstance(v, str) else [str(v.get("query", ""))]
            else:
                out += _queries(v)
    elif isinstance(node, list):
        for v in node:
            out += _queries(v)
    return out


def scraped_names() -> set[str]:
    metrics = Metrics()
    rec = CycleRecord(
        policy="p",
        started_at=datetime(2026, 1, 5, tzinfo=UTC),
        outcome="skipped",
        skipped="deploy-rollout",
        decision={"forecast": {"peak": 10.0, "upper": 12.0}},
        zones={"z": {"desired": 2, "actual": 1}},
        error_kinds=["nomad"],
    )
    metrics.observe(rec)
    metrics.is_leader.set(1)
    # a runbook run in this process (the engine's metrics live in the process registry)
    run = {"runbook": "dashboard-check", "status": "succeeded", "dry_run": False,
           "created_at": "2026-01-05T00:00:00+00:00"}  # fmt: skip
    DEFAULT_METRICS.finished(run, datetime(2026, 1, 5, 0, 5, tzinfo=UTC))
    DEFAULT_METRICS.triggered("dashboard-check", "pagerduty:Q1", "accepted")
    DEFAULT_METRICS.in_progress.labels("dashboard-check")
    # a rollout recorded in KV
    kv = MemoryKV()
    st = RolloutState(policy="p", image="i:2", job_id="j", namespace="n", status="rolling",
                      zones=["a"], updated_at="2026-01-05T00:00:00+00:00")  # fmt: skip
    StateStore(kv).create(st)
    metrics.registry.register(DeployCollector(kv, max_age_s=0))
    text = generate_latest(metrics.registry).decode()
    return {m.group(0) for m in re.finditer(r"^(nomadscale_[A-Za-z0-9_:]+)", text, re.M)}


def source_names() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "nomadscale").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            fn = node.func
            kind = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            first = node.args[0]
            if kind in SUFFIXES and isinstance(first, ast.Constant):
                base = str(first.value)
                if kind == "Counter":
                    base = base.removesuffix("_total")
                names |= {base + s for s in SUFFIXES[kind]}
    return names


def test_dashboard_queries_only_registered_metrics() -> None:
    used = {m for q in _queries(_dashboard()) for m in METRIC.findall(q)}
    assert used, "the dashboard queries no nomadscale metric"
    known = scraped_names() | source_names()
    assert used <= known, f"not exported by nomadscale: {sorted(used - known)}"


def test_every_panel_queries_metrics_the_service_exports() -> None:
    scraped = scraped_names()
    d = _dashboard()
    assert not [p["title"] for p in d["panels"] if p["type"] == "text"], "placeholder panels"
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            if t["expr"] == "$demand_query":  # the user's own demand query
                continue
            used = set(METRIC.findall(t["expr"]))
            assert used, f"panel {p['title']!r}: {t['expr']!r} uses no nomadscale metric"
            assert used <= scraped, f"panel {p['title']!r}: not on /metrics: {used - scraped}"


def test_every_service_metric_is_on_the_dashboard() -> None:
    used = {m for q in _queries(_dashboard()) for m in METRIC.findall(q)}
    series = {n for n in scraped_names() if not n.endswith("_created")}
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in series}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    missing = families - shown
    assert not missing, f"exported but not on the dashboard: {sorted(missing)}"


def test_dashboard_model_is_well_formed() -> None:
    d = _dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p.get("targets"):
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
        used_vars = set(re.findall(r"\$(\w+)", json.dumps(p.get("targets", []))))
        assert used_vars <= set(variables) | {"__rate_interval", "__interval"}, used_vars
