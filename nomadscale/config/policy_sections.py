"""The policy's sections: demand, forecast (business hours), capacity, bounds, zones, target
(node pool), schedules, alerting and deploy (SLI).

Every model is frozen and rejects unknown keys. Rules inside one section live here; rules that
span sections live in ``config.policy.cross_field_problems``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, ValidationInfo, field_validator, model_validator

from nomadscale.config.policy_checks import (
    Problem,
    bounds_rules,
    business_hours_rules,
    demand_rules,
    deploy_rules,
    schedule_rules,
    sli_rules,
    zones_rules,
)
from nomadscale.config.policy_fields import (
    HHMM,
    Cron,
    Day,
    Duration,
    Float,
    Int,
    Name,
    PolicyModel,
    PosDuration,
    Text,
    TimeZone,
    problem,
)


def _raise_first(found: list[Problem]) -> None:
    if found:
        path, message = found[0]
        raise problem(path, message)


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)", re.IGNORECASE)

# --- sections -------------------------------------------------------------------------------


class PrometheusDemand(PolicyModel):
    source: Literal["prometheus"]
    query: Text
    step: PosDuration = timedelta(minutes=1)
    lookback: PosDuration = timedelta(days=28)

    @property
    def step_s(self) -> float:
        return self.step.total_seconds()

    @property
    def lookback_s(self) -> float:
        return self.lookback.total_seconds()

    @model_validator(mode="after")
    def _check(self) -> PrometheusDemand:
        _raise_first(demand_rules(self.step, self.lookback))
        return self


class TraceDemand(PolicyModel):
    source: Literal["trace"]
    trace: Text  # CSV path; relative paths are resolved against the policy file's folder
    step: PosDuration = timedelta(minutes=1)

    @property
    def step_s(self) -> float:
        return self.step.total_seconds()

    @field_validator("trace")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        if base is None:
            return v
        path = Path(base) / Path(v).expanduser()
        if not path.is_file():
            raise ValueError(f"trace file not found: {v} (looked in {path})")
        return str(path.resolve())


Demand = Annotated[PrometheusDemand | TraceDemand, Field(discriminator="source")]


class BusinessHours(PolicyModel):
    days: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri")
    start: HHMM
    end: HHMM
    timezone: TimeZone = "UTC"
    target_availability: Float | None = Field(default=None, gt=0.5, lt=1.0)
    min_workers: Int | None = Field(default=None, ge=0)

    @property
    def start_minute(self) -> int:
        h, m = self.start.split(":")
        return int(h) * 60 + int(m)

    @property
    def end_minute(self) -> int:
        h, m = self.end.split(":")
        return int(h) * 60 + int(m)

    @model_validator(mode="after")
    def _check(self) -> BusinessHours:
        _raise_first(business_hours_rules(self.days, self.start, self.end))
        return self


class ForecastSpec(PolicyModel):
    model: Literal["auto", "regress", "slope", "seasonal", "weighted", "blend"] = "auto"
    target_availability: Float = Field(default=0.99, gt=0.5, lt=1.0)
    business_hours: BusinessHours | None = None


class Capacity(PolicyModel):
    rpm_per_worker: Float = Field(gt=0)


class Bounds(PolicyModel):
    min: Int = Field(ge=0)
    max: Int = Field(ge=0)
    max_step_up: Int | None = Field(default=None, ge=1)
    max_step_down: Int | None = Field(default=None, ge=1)
    scale_down_cooldown: Duration = timedelta(0)

    @property
    def scale_down_cooldown_s(self) -> float:
        return self.scale_down_cooldown.total_seconds()

    @model_validator(mode="after")
    def _check(self) -> Bounds:
        _raise_first(bounds_rules(self.min, self.max))
        return self


class Zone(PolicyModel):
    name: Text
    group: Text  # Nomad task group serving this zone
    node_pool: Text
    instance_group: Text | None = None


class Zones(PolicyModel):
    split: Literal["odd-even"] = "odd-even"
    items: tuple[Zone, ...] = Field(alias="list")

    @model_validator(mode="after")
    def _check(self) -> Zones:
        names = [z.name for z in self.items]
        _raise_first(zones_rules(self.split, names, [z.group for z in self.items]))
        return self


class NodePool(PolicyModel):
    provider: Literal["gce-mig"]
    project: Text
    workers_per_node: Int = Field(default=1, ge=1)
    drain_deadline: PosDuration = timedelta(minutes=15)
    scale_in_order: Literal["empty-then-oldest", "oldest"] = "empty-then-oldest"

    @property
    def drain_deadline_s(self) -> float:
        return self.drain_deadline.total_seconds()


class Target(PolicyModel):
    job: Text
    namespace: Text = "default"
    node_pool: NodePool | None = None


class Schedule(PolicyModel):
    name: Name
    cron: Cron
    timezone: TimeZone = "UTC"
    duration: PosDuration
    min: Int | None = Field(default=None, ge=0)
    max: Int | None = Field(default=None, ge=0)
    fixed: Int | None = Field(default=None, ge=0)

    @property
    def duration_s(self) -> float:
        return self.duration.total_seconds()

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        given = [k for k in ("min", "max", "fixed") if getattr(self, k) is not None]
        _raise_first(schedule_rules(given))
        return self


class Alerting(PolicyModel):
    pagerduty_routing_key_env: str | None = None  # NAME of the env var holding the key
    failed_cycles_before_alert: Int = Field(default=3, ge=1)

    @field_validator("pagerduty_routing_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            # never echo the value: it may be the routing key itself
            raise ValueError(
                "must be the NAME of an environment variable holding the key "
                "(e.g. NOMADSCALE_PD_ROUTING_KEY), not the key itself"
            )
        return v


class SLI(PolicyModel):
    error_rate_query: Text
    latency_query: Text | None = None
    max_error_rate: Float = Field(default=0.01, ge=0, le=1)
    max_latency: PosDuration | None = None
    window: PosDuration = timedelta(minutes=5)

    @property
    def window_s(self) -> float:
        return self.window.total_seconds()

    @model_validator(mode="after")
    def _check(self) -> SLI:
        _raise_first(sli_rules(self.latency_query is not None, self.max_latency is not None))
        return self


def _size(value: Any) -> str:
    if not isinstance(value, str) or not _SIZE.fullmatch(value.strip()):
        raise ValueError(f"not a size: {value!r} (use e.g. 700MB, 7GB, 7GiB)")
    return value.strip()


class Deploy(PolicyModel):
    image: Text
    image_size: Annotated[str, PlainValidator(_size)] | None = None
    prefetch_job: Text | None = None
    prefetch_retries: Int = Field(default=2, ge=0)
    on_prefetch_failure: Literal["block", "ineligible"] = "block"
    canary: Int = Field(default=1, ge=0)
    min_healthy_time: Duration = timedelta(seconds=30)
    healthy_deadline: PosDuration = timedelta(minutes=5)
    progress_deadline: PosDuration = timedelta(minutes=10)
    sli: SLI | None = None

    @property
    def image_size_bytes(self) -> int | None:
        if self.image_size is None:
            return None
        m = _SIZE.fullmatch(self.image_size)
        assert m is not None
        unit = m.group(2).lower()
        base = 1024 if "i" in unit else 1000
        power = "bkmgt".index(unit[0]) if unit != "b" else 0
        return int(float(m.group(1)) * base**power)

    @model_validator(mode="after")
    def _check(self) -> Deploy:
        _raise_first(
            deploy_rules(self.min_healthy_time, self.healthy_deadline, self.progress_deadline)
        )
        return self
