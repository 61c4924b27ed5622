"""The policy model: one ``policies/<name>.yaml`` file per worker group.

``Policy`` is the top level; its sections live in ``config.policy_sections`` and the field
types (durations, names, times, cron) in ``config.policy_fields``. Every model is frozen and
rejects unknown keys. Durations are written as ``20m``/``1h30m`` and stored as ``timedelta``
(``*_s`` properties give seconds). Cross-field rules that span sections (``lead_time < cycle``,
business-hours ``min_workers <= bounds.max`` ...) live in ``cross_field_problems`` so the
validator can report them together with every other error; ``Policy`` enforces them too when
built directly.

Load files with ``load_policy`` / ``load_policies`` (implemented in ``config.validate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr, ValidationInfo, field_validator, model_validator

from nomadscale.config.policy_checks import schedule_names_rules, section_problems
from nomadscale.config.policy_fields import (
    Duration,
    Name,
    PolicyModel,
    PosDuration,
    problem,
    to_duration,
)
from nomadscale.config.policy_sections import (
    Alerting,
    Bounds,
    Capacity,
    Demand,
    Deploy,
    ForecastSpec,
    Schedule,
    Target,
    Zones,
)
from nomadscale.core.durations import format_duration

# --- the policy -----------------------------------------------------------------------------


class Policy(PolicyModel):
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
        found = schedule_names_rules([s.name for s in v])
        if found:
            path, message = found[0]
            raise problem(path, message)
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
        return to_duration(value)
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


__all__ = [
    "Policy",
    "cross_field_problems",
    "load_policies",
    "load_policy",
    "section_problems",
]
