"""The rules inside one policy section, as plain functions over plain values.

The section models (``config.policy_sections``) raise the first problem these functions find;
``section_problems`` runs them all on raw (unvalidated) policy data, so ``policy validate``
reports every broken rule of every section in one pass, also while other fields of the same
section are invalid (pydantic skips a model's own rules then). A rule is skipped when a value
it needs is itself invalid: that value gets its own error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from nomadscale.config.policy_fields import hhmm_text, to_duration
from nomadscale.core.durations import format_duration

Path = tuple[str | int, ...]
Problem = tuple[Path, str]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# --- the rules (paths are relative to the section) -------------------------------------------


def bounds_rules(lo: int, hi: int) -> list[Problem]:
    return [(("min",), f"must be <= bounds.max ({lo} > {hi})")] if lo > hi else []


def demand_rules(step: timedelta, lookback: timedelta) -> list[Problem]:
    if lookback <= step:
        why = f"({format_duration(lookback)} <= {format_duration(step)})"
        return [(("lookback",), f"must be longer than step {why}")]
    return []


def business_hours_rules(days: Sequence[str], start: str, end: str) -> list[Problem]:
    out: list[Problem] = []
    if not days:
        out.append((("days",), "must name at least one day"))
    elif len(set(days)) != len(days):
        out.append((("days",), "lists a day twice"))
    if _minute(start) >= 24 * 60:
        out.append(
            (("start",), "24:00 is only an end time; a window starting at midnight starts at 00:00")
        )
    elif _minute(start) == _minute(end):
        out.append((("end",), f"must differ from start ({start}): the window would be empty"))
    # start after end is a window over midnight (22:00-06:00), as the forecaster reads it
    # (stages.forecast.BusinessHours.in_hours); ``days`` names the local day of each moment
    return out


def zones_rules(split: str, names: Sequence[str], groups: Sequence[str]) -> list[Problem]:
    out: list[Problem] = []
    if split == "odd-even" and len(names) != 2:
        out.append((("list",), f"odd-even needs exactly 2 zones, got {len(names)}"))
    for attr, values in (("name", names), ("group", groups)):
        seen: set[str] = set()
        for i, value in enumerate(values):
            if value in seen:
                out.append((("list", i, attr), f"duplicate zone {attr} {value!r}"))
            seen.add(value)
    return out


def schedule_rules(given: Sequence[str]) -> list[Problem]:
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        return [(("min",), f"needs exactly one of min, max, fixed (got {what})")]
    return []


def schedule_names_rules(names: Sequence[str | None]) -> list[Problem]:
    out: list[Problem] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            continue
        if name in seen:
            out.append(((i, "name"), f"duplicate schedule name {name!r}"))
        seen.add(name)
    return out


def sli_rules(has_latency_query: bool, has_max_latency: bool) -> list[Problem]:
    if has_latency_query != has_max_latency:
        return [(("max_latency",), "latency_query and max_latency go together")]
    return []


def deploy_rules(min_healthy: timedelta, healthy: timedelta, progress: timedelta) -> list[Problem]:
    out: list[Problem] = []
    if min_healthy >= healthy:
        out.append(
            (
                ("min_healthy_time",),
                f"must be shorter than healthy_deadline ({format_duration(min_healthy)}"
                f" >= {format_duration(healthy)})",
            )
        )
    if healthy >= progress:
        out.append(
            (
                ("healthy_deadline",),
                f"must be shorter than progress_deadline ({format_duration(healthy)}"
                f" >= {format_duration(progress)})",
            )
        )
    return out


def _minute(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


# --- on raw data ---------------------------------------------------------------------------


class _Skip(Exception):
    """A value a rule needs is invalid (it has its own error)."""


def _map(data: Any, key: str) -> Mapping[str, Any] | None:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, Mapping) else None


def _int(data: Mapping[str, Any], key: str) -> int:
    v = data.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _Skip
    return v


def _dur(data: Mapping[str, Any], key: str, default: timedelta, *, positive: bool) -> timedelta:
    if key not in data:
        return default
    try:
        td = to_duration(data[key])
    except (ValueError, TypeError):
        raise _Skip from None
    if positive and td <= timedelta(0):
        raise _Skip
    return td


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Skip
    return value.strip()


def _hhmm(value: Any) -> str:
    try:
        return hhmm_text(value)
    except ValueError:
        raise _Skip from None


def _at(prefix: Path, found: list[Problem]) -> list[Problem]:
    return [((*prefix, *path), message) for path, message in found]


def _checks(data: Mapping[str, Any]) -> list[tuple[Path, Any]]:
    """(section path, zero-argument check) for every section present in ``data``."""
    out: list[tuple[Path, Any]] = []
    if (b := _map(data, "bounds")) is not None:
        out.append((("bounds",), lambda b=b: bounds_rules(_int(b, "min"), _int(b, "max"))))
    d = _map(data, "demand")
    if d is not None and d.get("source") == "prometheus":
        out.append(
            (
                ("demand",),
                lambda d=d: demand_rules(
                    _dur(d, "step", timedelta(minutes=1), positive=True),
                    _dur(d, "lookback", timedelta(days=28), positive=True),
                ),
            )
        )
    if (bh := _map(_map(data, "forecast"), "business_hours")) is not None:
        out.append((("forecast", "business_hours"), lambda bh=bh: _bh(bh)))
    if (z := _map(data, "zones")) is not None:
        out.append((("zones",), lambda z=z: _zones(z)))
    schedules = data.get("schedules")
    if isinstance(schedules, list):
        for i, s in enumerate(schedules):
            if isinstance(s, Mapping):
                given = [k for k in ("min", "max", "fixed") if s.get(k) is not None]
                out.append((("schedules", i), lambda g=given: schedule_rules(g)))
        names = [_name_or_none(s) for s in schedules]
        out.append((("schedules",), lambda n=names: schedule_names_rules(n)))
    if (dep := _map(data, "deploy")) is not None:
        out.append((("deploy",), lambda dep=dep: _deploy(dep)))
        if (sli := _map(dep, "sli")) is not None:
            out.append(
                (
                    ("deploy", "sli"),
                    lambda sli=sli: sli_rules(
                        sli.get("latency_query") is not None, sli.get("max_latency") is not None
                    ),
                )
            )
    return out


def _name_or_none(s: Any) -> str | None:
    if not isinstance(s, Mapping):
        return None
    try:
        return _text(s.get("name"))
    except _Skip:
        return None


def _bh(bh: Mapping[str, Any]) -> list[Problem]:
    days = bh.get("days", DAYS[:5])
    if not isinstance(days, list | tuple) or any(d not in DAYS for d in days):
        raise _Skip
    return business_hours_rules(list(days), _hhmm(bh.get("start")), _hhmm(bh.get("end")))


def _zones(z: Mapping[str, Any]) -> list[Problem]:
    items = z.get("list")
    split = z.get("split", "odd-even")
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise _Skip
    names = [_text(i.get("name")) for i in items]
    groups = [_text(i.get("group")) for i in items]
    return zones_rules(split if isinstance(split, str) else "", names, groups)


def _deploy(dep: Mapping[str, Any]) -> list[Problem]:
    return deploy_rules(
        _dur(dep, "min_healthy_time", timedelta(seconds=30), positive=False),
        _dur(dep, "healthy_deadline", timedelta(minutes=5), positive=True),
        _dur(dep, "progress_deadline", timedelta(minutes=10), positive=True),
    )


def section_problems(data: Any) -> list[Problem]:
    """Every section rule broken in raw policy ``data``: ``[(path, message), ...]``."""
    if not isinstance(data, Mapping):
        return []
    out: list[Problem] = []
    for prefix, check in _checks(data):
        try:
            out.extend(_at(prefix, check()))
        except _Skip:
            continue
    return out


__all__ = [
    "bounds_rules",
    "business_hours_rules",
    "demand_rules",
    "deploy_rules",
    "schedule_names_rules",
    "schedule_rules",
    "section_problems",
    "sli_rules",
    "zones_rules",
]
