"""Operator overrides and scheduled windows.

An ``Override`` pins the worker count of one policy for a while: ``min``/``max`` bound it,
``fixed`` sets it, ``pause`` stops scaling altogether. They come from the CLI
(``nomadscale override``), from a policy's ``schedules:`` (cron + timezone + duration) and
from ``nomadscale scale`` (a fixed count for a while).

Precedence in ``apply_overrides``: pause > fixed > max/min. Among several ``fixed`` the most
recently created wins; several mins -> the largest, several maxes -> the smallest; a min above
a max wins (availability before cost) and the description says so.

Schedules use standard 5-field cron in the schedule's timezone. Numeric days of week follow
cron (0 and 7 = Sunday); when both day-of-month and day-of-week are restricted a day matches
either, and a day field starting with ``*`` (``*/2``) is unrestricted (Vixie cron; the one
translation in ``core.cron``, which policy validation uses too). A window is active when it started within ``duration`` before ``now``;
durations are elapsed time, so a window across a DST change still lasts exactly ``duration``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal, cast

from nomadscale.core.cron import cron_triggers
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import InputError

Kind = Literal["min", "max", "fixed", "pause"]
Source = Literal["cli", "schedule", "scale"]
KINDS: tuple[str, ...] = ("min", "max", "fixed", "pause")
SOURCES: tuple[str, ...] = ("cli", "schedule", "scale")


@dataclass(frozen=True, slots=True)
class Override:
    policy: str
    kind: Kind
    value: int | None  # None only for pause
    reason: str
    who: str
    created_at: datetime
    expires_at: datetime | None  # None = until removed
    source: Source = "cli"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"override: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.source not in SOURCES:
            raise InputError(
                f"override: source must be one of {', '.join(SOURCES)}, got {self.source!r}"
            )
        if self.kind == "pause":
            if self.value is not None:
                raise InputError("override: a pause takes no value")
        elif not isinstance(self.value, int) or isinstance(self.value, bool) or self.value < 0:
            raise InputError(f"override: {self.kind} needs a whole number >= 0, got {self.value!r}")
        for name in ("created_at", "expires_at"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, datetime) or v.tzinfo is None):
                raise InputError(f"override: {name} must be a timezone-aware datetime")
        if self.expires_at is not None and self.expires_at <= self.created_at:
            raise InputError("override: expires_at must be after created_at")

    def active(self, now: datetime) -> bool:
        """Started at or before ``now`` and not yet expired."""
        return self.created_at <= now and (self.expires_at is None or now < self.expires_at)

    def label(self) -> str:
        """Short text: ``min 10 (schedule month-end-close)``, ``pause (cli alice)``."""
        head = self.kind if self.value is None else f"{self.kind} {self.value}"
        origin = self.reason if self.source == "schedule" else self.who
        return f"{head} ({self.source} {origin})".replace(" )", ")")

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "kind": self.kind,
            "value": self.value,
            "reason": self.reason,
            "who": self.who,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        """Rebuild from ``to_dict`` output; anything malformed raises ``InputError``."""
        if not isinstance(data, Mapping):
            raise InputError(f"override: expected an object, got {type(data).__name__}")
        missing = [k for k in ("policy", "kind", "created_at") if k not in data]
        if missing:
            raise InputError(f"override: missing field(s) {', '.join(missing)}")
        for k in ("policy", "reason", "who"):
            if not isinstance(data.get(k, ""), str):
                raise InputError(f"override: {k} must be a string")
        return cls(
            policy=data["policy"],
            kind=data["kind"],
            value=data.get("value"),
            reason=data.get("reason", ""),
            who=data.get("who", ""),
            created_at=_parse_time(data["created_at"], "created_at"),
            expires_at=(
                None
                if data.get("expires_at") is None
                else _parse_time(data["expires_at"], "expires_at")
            ),
            source=data.get("source", "cli"),
        )


def _parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise InputError(f"override: {name} must be an ISO 8601 string, got {value!r}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"override: {name} is not an ISO 8601 time: {value!r}") from None
    if dt.tzinfo is None:
        raise InputError(f"override: {name} needs a timezone offset: {value!r}")
    return dt


# --- applying overrides --------------------------------------------------------------------


def active_overrides(overrides: Iterable[Override], *, now: datetime) -> list[Override]:
    return [o for o in overrides if o.active(now)]


def paused(overrides: Iterable[Override], *, now: datetime) -> Override | None:
    """The active pause, if any (the most recently created)."""
    pauses = [o for o in overrides if o.kind == "pause" and o.active(now)]
    return max(pauses, key=lambda o: o.created_at) if pauses else None


def apply_overrides(
    count: int, overrides: Iterable[Override], *, now: datetime
) -> tuple[int, str | None]:
    """Apply the active overrides to ``count``; return the new count and what applied.

    A pause returns ``count`` unchanged (the caller holds the current count). The description
    is ``None`` when no override is active.
    """
    live = active_overrides(overrides, now=now)
    if not live:
        return count, None
    pause = paused(live, now=now)
    if pause is not None:
        return count, f"{pause.label()}: scaling paused"
    fixed = [o for o in live if o.kind == "fixed"]
    if fixed:
        f = max(fixed, key=lambda o: o.created_at)
        value = cast(int, f.value)
        return value, f"{f.label()}: {count} -> {value}"
    mins = [o for o in live if o.kind == "min"]
    maxes = [o for o in live if o.kind == "max"]
    lo = max(mins, key=lambda o: cast(int, o.value)) if mins else None
    hi = min(maxes, key=lambda o: cast(int, o.value)) if maxes else None
    new = count
    parts: list[str] = []
    if hi is not None and new > cast(int, hi.value):
        new = cast(int, hi.value)
        parts.append(f"{hi.label()} lowered {count} -> {new}")
    if lo is not None and new < cast(int, lo.value):
        before = new
        new = cast(int, lo.value)
        parts.append(f"{lo.label()} raised {before} -> {new}")
        if hi is not None and new > cast(int, hi.value):
            parts.append(f"min wins over {hi.label()}")
    if not parts:
        names = ", ".join(o.label() for o in (lo, hi) if o is not None)
        return count, f"{names} active, not binding"
    return new, "; ".join(parts)


# --- scheduled windows ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    """A recurring window: from each cron fire time, for ``duration_s`` seconds."""

    name: str
    cron: str
    timezone: str
    duration_s: float
    kind: Kind
    value: int | None = None

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise InputError(f"schedule {self.name}: duration must be positive")
        if self.kind not in KINDS:
            raise InputError(f"schedule {self.name}: kind must be one of {', '.join(KINDS)}")
        cron_triggers(self.cron, self.timezone, self.name)  # validate early

    @classmethod
    def coerce(cls, obj: Any) -> Schedule:
        """Accept a ``Schedule``, a policy schedule model or a mapping with ``name``,
        ``cron``, ``timezone``, ``duration`` and exactly one of ``min``/``max``/``fixed``/
        ``pause``."""
        if isinstance(obj, Schedule):
            return obj

        def get(key: str, default: Any = None) -> Any:
            if isinstance(obj, Mapping):
                return obj.get(key, default)
            return getattr(obj, key, default)

        name = str(get("name", "") or "schedule")
        chosen = [k for k in ("min", "max", "fixed") if get(k) is not None]
        if get("pause"):
            chosen.append("pause")
        if len(chosen) != 1:
            raise InputError(f"schedule {name}: set exactly one of min, max, fixed, pause")
        kind = cast(Kind, chosen[0])
        value = None if kind == "pause" else get(kind)
        dur = get("duration")
        if dur is None:
            dur = get("duration_s")
        try:
            duration_s = parse_duration(dur).total_seconds()
        except (ValueError, TypeError) as e:
            raise InputError(f"schedule {name}: duration: {e}") from None
        return cls(
            name=name,
            cron=str(get("cron", "")),
            timezone=str(get("timezone", "UTC") or "UTC"),
            duration_s=duration_s,
            kind=kind,
            value=None if value is None else int(value),
        )


# the largest jump of a UTC offset (a DST change is 1h, a few zones have had 2h): a fire time
# at a skipped local time is found by searching from this far before the window
_MAX_SHIFT = timedelta(hours=3)


def _fixed_time(cron: str) -> bool:
    """Minute and hour are both fixed (``30 1 * * *``), as cron defines a "fixed-time" job."""
    minute, hour = [*cron.split(), "*", "*"][:2]
    return not minute.startswith("*") and not hour.startswith("*")


def _repeated(fire: datetime, zone: tzinfo | None) -> bool:
    """``fire`` is the second occurrence of a local time (the hour a DST change repeats)."""
    if zone is None:
        return False
    local = fire.astimezone(zone)
    return local.replace(fold=0).astimezone(UTC) != fire.astimezone(UTC)


def last_start(schedule: Schedule, *, now: datetime, within_s: float) -> datetime | None:
    """The latest fire time in ``(now - within_s, now]`` (UTC), or None.

    Like cron across DST changes: a fixed-time entry (``30 1 * * *``) fires once on the day
    the clocks go back (not again in the repeated hour), and on the day they go forward a
    local time that does not exist fires at that time read with the offset before the change
    (02:30 in New York on a spring-forward day fires at 03:30 EDT).
    """
    now = now.astimezone(UTC)  # elapsed-time arithmetic, never wall-clock
    since = now - timedelta(seconds=within_s) + timedelta(microseconds=1)
    fixed = _fixed_time(schedule.cron)
    best: datetime | None = None
    for trig in cron_triggers(schedule.cron, schedule.timezone, schedule.name):
        zone = cast(tzinfo | None, getattr(trig, "timezone", None))
        cursor = since - _MAX_SHIFT
        latest = None
        for _ in range(100_000):  # bounded: a minutely cron over a long window
            fire = trig.get_next_fire_time(None, cursor)
            if fire is None:
                break
            fire = fire.astimezone(UTC)
            if fire > now:
                break
            if fire >= since and not (fixed and _repeated(fire, zone)):
                latest = fire
            # strictly forward in elapsed time: APScheduler can repeat a fire in the DST hour
            cursor = max(cursor, fire) + timedelta(seconds=1)
        if latest is not None and (best is None or latest > best):
            best = latest
    return best


def active_schedules(
    schedules: Sequence[Any], *, now: datetime, policy: str = ""
) -> list[Override]:
    """Overrides for the schedule windows active at ``now`` (``source="schedule"``)."""
    if now.tzinfo is None:
        raise InputError("active_schedules: now must be timezone-aware")
    out: list[Override] = []
    for raw in schedules:
        sch = Schedule.coerce(raw)
        start = last_start(sch, now=now, within_s=sch.duration_s)
        if start is None:
            continue
        out.append(
            Override(
                policy=policy,
                kind=sch.kind,
                value=sch.value,
                reason=sch.name,
                who="schedule",
                created_at=start,
                expires_at=start + timedelta(seconds=sch.duration_s),
                source="schedule",
            )
        )
    return out


def describe_schedule(schedule: Schedule) -> str:
    head = schedule.kind if schedule.value is None else f"{schedule.kind} {schedule.value}"
    return (
        f"{schedule.name}: {head} at '{schedule.cron}' {schedule.timezone} "
        f"for {format_duration(schedule.duration_s)}"
    )
