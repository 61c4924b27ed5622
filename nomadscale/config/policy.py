"""The policy model: one ``policies/<name>.yaml`` file per worker group.

Every model is frozen and rejects unknown keys. Durations are written as ``20m``/``1h30m``
and stored as ``timedelta`` (``*_s`` properties give seconds). Cross-field rules that span
sections (``lead_time < cycle``, business-hours ``min_workers <= bounds.max`` ...) live in
``cross_field_problems`` so the validator can report them together with every other error;
``Policy`` enforces them too when built directly.

Load files with ``load_policy`` / ``load_policies`` (implemented in ``config.validate``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    Strict,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from nomadscale.core.durations import format_duration, parse_duration

# --- field types ----------------------------------------------------------------------------


def _duration(value: Any) -> timedelta:
    if value is None or isinstance(value, list | dict | tuple):
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 20m, 1h30m, 2d)")
    try:
        td = parse_duration(value)
    except OverflowError:
        raise ValueError(f"duration too long: {value!r}") from None
    except ValueError as exc:
        if "NaN" in str(exc) or "nan" in str(value).lower():
            raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 20m, 1h30m, 2d)") from None
        raise
    if td > timedelta(days=3650):
        raise ValueError(f"duration too long: {value!r} (at most 3650d)")
    return td


def _positive(td: timedelta) -> timedelta:
    if td <= timedelta(0):
        raise ValueError("must be longer than 0s")
    return td


def _format(td: timedelta) -> str:
    """Like ``format_duration`` but exact for sub-second values (800ms, 1.5s)."""
    secs = td.total_seconds()
    if secs == int(secs):
        return format_duration(td)
    ms = secs * 1000
    return f"{ms:g}ms" if ms == int(ms) and secs < 1 else f"{secs:g}s"


_dur_ser = PlainSerializer(_format, return_type=str)
Duration = Annotated[timedelta, PlainValidator(_duration), _dur_ser]
PosDuration = Annotated[timedelta, PlainValidator(lambda v: _positive(_duration(v))), _dur_ser]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HHMM = re.compile(r"([01]\d|2[0-3]):[0-5]\d|24:00")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def _dns_label(v: str) -> str:
    if not _DNS_LABEL.fullmatch(v):
        raise ValueError(
            f"{v!r} is not a valid name (lowercase letters, digits and '-', "
            "at most 63, starting and ending with a letter or digit)"
        )
    return v


def _timezone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {v!r}") from None
    return v


def _hhmm(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError('must be a quoted "HH:MM" time (unquoted 20:00 reads as a number)')
    if not isinstance(value, str) or not _HHMM.fullmatch(value.strip()):
        raise ValueError(f'must be a "HH:MM" time, got {value!r}')
    return value.strip()


def _cron(v: str) -> str:
    from nomadscale.core.cron import cron_triggers
    from nomadscale.core.errors import InputError

    if len(v.split()) != 5:
        raise ValueError(f"bad cron expression {v!r}: need 5 fields (min hour day month weekday)")
    try:
        cron_triggers(v, "UTC", "cron")
    except InputError as exc:
        raise ValueError(
            f"bad cron expression {v!r}: {str(exc).removeprefix('schedule cron: ')}"
        ) from None
    return v


Name = Annotated[Text, AfterValidator(_dns_label)]
TimeZone = Annotated[Text, AfterValidator(_timezone)]
HHMM = Annotated[str, PlainValidator(_hhmm)]
Cron = Annotated[Text, AfterValidator(_cron)]


def problem(field: str | tuple[str | int, ...], message: str) -> PydanticCustomError:
    """A cross-field error; ``field`` is the path (relative to the model) it is reported on."""
    path = (field,) if isinstance(field, str) else field
    return PydanticCustomError("policy_rule", message, {"field": path})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- sections -------------------------------------------------------------------------------


class PrometheusDemand(_Model):
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
        if self.lookback <= self.step:
            raise problem(
                "lookback",
                f"must be longer than step ({format_duration(self.lookback)} <= "
                f"{format_duration(self.step)})",
            )
        return self


class TraceDemand(_Model):
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


class BusinessHours(_Model):
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
        if not self.days:
            raise problem("days", "must name at least one day")
        if len(set(self.days)) != len(self.days):
            raise problem("days", "lists a day twice")
        if self.start_minute >= self.end_minute:
            raise problem("end", f"must be later than start ({self.end} <= {self.start})")
        return self


class ForecastSpec(_Model):
    model: Literal["auto", "regress", "slope", "seasonal", "weighted", "blend"] = "auto"
    target_availability: Float = Field(default=0.99, gt=0.5, lt=1.0)
    business_hours: BusinessHours | None = None


class Capacity(_Model):
    rpm_per_worker: Float = Field(gt=0)


class Bounds(_Model):
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
        if self.min > self.max:
            raise problem("min", f"must be <= bounds.max ({self.min} > {self.max})")
        return self


class Zone(_Model):
    name: Text
    group: Text  # Nomad task group serving this zone
    node_pool: Text
    instance_group: Text | None = None


class Zones(_Model):
    split: Literal["odd-even"] = "odd-even"
    items: tuple[Zone, ...] = Field(alias="list")

    @model_validator(mode="after")
    def _check(self) -> Zones:
        if self.split == "odd-even" and len(self.items) != 2:
            raise problem("list", f"odd-even needs exactly 2 zones, got {len(self.items)}")
        for attr in ("name", "group"):
            seen: set[str] = set()
            for i, z in enumerate(self.items):
                value = getattr(z, attr)
                if value in seen:
                    raise problem(("list", i, attr), f"duplicate zone {attr} {value!r}")
                seen.add(value)
        return self


class NodePool(_Model):
    provider: Literal["gce-mig"]
    project: Text
    workers_per_node: Int = Field(default=1, ge=1)
    drain_deadline: PosDuration = timedelta(minutes=15)
    scale_in_order: Literal["empty-then-oldest", "oldest"] = "empty-then-oldest"

    @property
    def drain_deadline_s(self) -> float:
        return self.drain_deadline.total_seconds()


class Target(_Model):
    job: Text
    namespace: Text = "default"
    node_pool: NodePool | None = None


class Schedule(_Model):
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
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise problem("min", f"needs exactly one of min, max, fixed (got {what})")
        return self


class Alerting(_Model):
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


class SLI(_Model):
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
        if (self.latency_query is None) != (self.max_latency is None):
            raise problem("max_latency", "latency_query and max_latency go together")
        return self


def _size(value: Any) -> str:
    if not isinstance(value, str) or not _SIZE.fullmatch(value.strip()):
        raise ValueError(f"not a size: {value!r} (use e.g. 700MB, 7GB, 7GiB)")
    return value.strip()


class Deploy(_Model):
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
        if self.min_healthy_time >= self.healthy_deadline:
            raise problem(
                "min_healthy_time",
                f"must be shorter than healthy_deadline ({format_duration(self.min_healthy_time)}"
                f" >= {format_duration(self.healthy_deadline)})",
            )
        if self.healthy_deadline >= self.progress_deadline:
            raise problem(
                "healthy_deadline",
                f"must be shorter than progress_deadline ({format_duration(self.healthy_deadline)}"
                f" >= {format_duration(self.progress_deadline)})",
            )
        return self


# --- the policy -----------------------------------------------------------------------------


class Policy(_Model):
    name: Name
    cycle: PosDuration = timedelta(minutes=20)
    lead_time: Duration = timedelta(minutes=10)
    demand: Demand
    forecast: ForecastSpec = ForecastSpec()
    capacity: Capacity
    bounds: Bounds
    zones: Zones
    target: Target
    schedules: tuple[Schedule, ...] = ()
    alerting: Alerting = Alerting()
    deploy: Deploy | None = None

    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this policy was loaded from (None when built in code)."""
        return self._source

    @property
    def cycle_s(self) -> float:
        return self.cycle.total_seconds()

    @property
    def lead_time_s(self) -> float:
        return self.lead_time.total_seconds()

    @property
    def horizon_s(self) -> float:
        """Seconds one decision must cover: cycle + lead time."""
        return self.cycle_s + self.lead_time_s

    @field_validator("cycle")
    @classmethod
    def _cycle_aligns(cls, v: timedelta) -> timedelta:
        secs = v.total_seconds()
        if secs % 60 or 1440 % int(secs // 60):
            raise ValueError(
                "must be whole minutes that divide a day (e.g. 10m, 15m, 20m, 30m, 1h), "
                f"got {format_duration(v)}"
            )
        return v

    @field_validator("schedules")
    @classmethod
    def _unique_schedules(cls, v: tuple[Schedule, ...]) -> tuple[Schedule, ...]:
        seen: set[str] = set()
        for i, s in enumerate(v):
            if s.name in seen:
                raise problem((i, "name"), f"duplicate schedule name {s.name!r}")
            seen.add(s.name)
        return v

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> Policy:
        found = cross_field_problems(self.model_dump(by_alias=True))
        if found:
            path, message = found[0]
            raise problem(path, message)
        source = (info.context or {}).get("source")
        if source is not None:
            self._source = Path(source)
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        """The effective policy (defaults filled in) as plain YAML-ready data."""
        return self.model_dump(mode="json", by_alias=True)


BH_MIN = ("forecast", "business_hours", "min_workers")


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _dur_or_none(value: Any) -> timedelta | None:
    if isinstance(value, timedelta):
        return value
    try:
        return _duration(value)
    except (ValueError, TypeError):
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cross_field_problems(data: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Rules spanning sections, checked on raw (or dumped) policy data.

    Tolerant of bad input: a rule is skipped when a value it needs is itself invalid (that
    value gets its own error). Returns ``[(path, message), ...]``.
    """
    out: list[tuple[tuple[str | int, ...], str]] = []
    if not isinstance(data, Mapping):
        return out
    cycle = _dur_or_none(data.get("cycle", timedelta(minutes=20)))
    lead = _dur_or_none(data.get("lead_time", timedelta(minutes=10)))
    if cycle is not None and lead is not None and cycle > timedelta(0) and lead >= cycle:
        why = f"({format_duration(lead)} >= {format_duration(cycle)})"
        out.append((("lead_time",), f"must be shorter than cycle {why}"))
    bmax = _int_or_none(_get(data, "bounds", "max"))
    schedules = data.get("schedules")
    limited: list[tuple[tuple[str | int, ...], Any]] = [(BH_MIN, _get(data, *BH_MIN))]
    for i, s in enumerate(schedules if isinstance(schedules, list | tuple) else ()):
        limited += [(("schedules", i, key), _get(s, key)) for key in ("min", "fixed")]
    for path, value in limited:
        n = _int_or_none(value)
        if bmax is not None and n is not None and n > bmax:
            out.append((path, f"must be <= bounds.max ({n} > {bmax})"))
    zone_list = _get(data, "zones", "list")
    if isinstance(_get(data, "target", "node_pool"), Mapping):
        for i, z in enumerate(zone_list if isinstance(zone_list, list | tuple) else ()):
            if isinstance(z, Mapping) and z.get("instance_group") is None:
                where = ("zones", "list", i, "instance_group")
                out.append((where, "required when target.node_pool is set"))
    return out


# --- loading (implemented in config.validate; re-exported here for convenience) -------------


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy file; raise ConfigError listing every problem."""
    from nomadscale.config.validate import load_policy as _load

    return _load(path)


def load_policies(paths: Iterable[str | Path]) -> list[Policy]:
    """Load policy files and directories (their *.yaml/*.yml); names must be unique."""
    from nomadscale.config.validate import load_policies as _load_all

    return _load_all(paths)
