"""Field types shared by the policy models: durations, names, times, cron, and the base model.

Durations are written as ``20m``/``1h30m`` (a unit is required, as in Nomad's own files) and
stored as ``timedelta``. ``problem`` builds a
cross-field error reported on a path relative to the model that raises it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    Strict,
    StringConstraints,
)
from pydantic_core import PydanticCustomError

from nomadscale.core.durations import format_duration, parse_duration

# --- field types ----------------------------------------------------------------------------


def to_duration(value: Any) -> timedelta:
    if value is None or isinstance(value, list | dict | tuple):
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 20m, 1h30m, 2d)")
    bare = value if isinstance(value, int | float) else str(value).strip()
    if not isinstance(value, bool | timedelta) and _BARE_NUMBER.fullmatch(str(bare)):
        if float(bare) != 0:  # 90 is 90 seconds to some, 90 minutes to others: say which
            raise ValueError(f"{bare} has no unit (write e.g. {bare}s, {bare}m or {bare}h)")
        return timedelta(0)
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
Duration = Annotated[timedelta, PlainValidator(to_duration), _dur_ser]
PosDuration = Annotated[timedelta, PlainValidator(lambda v: _positive(to_duration(v))), _dur_ser]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

_BARE_NUMBER = re.compile(r"\d+(\.\d+)?")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HHMM = re.compile(r"([01]\d|2[0-3]):[0-5]\d|24:00")


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


def hhmm_text(value: Any) -> str:
    """A "HH:MM" time of day (24:00 allowed) as text; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError('must be a quoted "HH:MM" time (unquoted 20:00 reads as a number)')
    if not isinstance(value, str) or not _HHMM.fullmatch(value.strip()):
        raise ValueError(f'must be a "HH:MM" time, got {value!r}')
    return value.strip()


def _cron(v: str) -> str:
    from nomadscale.core.cron import FIRE_HORIZON, cron_triggers, first_fire
    from nomadscale.core.errors import InputError

    if len(v.split()) != 5:
        raise ValueError(f"bad cron expression {v!r}: need 5 fields (min hour day month weekday)")
    try:
        cron_triggers(v, "UTC", "cron")
    except InputError as exc:
        raise ValueError(
            f"bad cron expression {v!r}: {str(exc).removeprefix('schedule cron: ')}"
        ) from None
    # the schedule engine itself decides (the live loop's): a window that never opens is a
    # mistake like Feb 31 (0 7 31 2 *); the dates repeat within the horizon, so none is lost
    if first_fire(v, "UTC", after=datetime.now(UTC)) is None:
        years = round(FIRE_HORIZON.days / 365.25)
        raise ValueError(
            f"bad cron expression {v!r}: never fires (no date matches its day, month and "
            f"weekday fields in the next {years} years)"
        )
    return v


Name = Annotated[Text, AfterValidator(_dns_label)]
TimeZone = Annotated[Text, AfterValidator(_timezone)]
HHMM = Annotated[str, PlainValidator(hhmm_text)]
Cron = Annotated[Text, AfterValidator(_cron)]


def problem(field: str | tuple[str | int, ...], message: str) -> PydanticCustomError:
    """A cross-field error; ``field`` is the path (relative to the model) it is reported on."""
    path = (field,) if isinstance(field, str) else field
    return PydanticCustomError("policy_rule", message, {"field": path})


class PolicyModel(BaseModel):
    """Frozen and rejects unknown keys, like every policy section."""

    model_config = ConfigDict(frozen=True, extra="forbid")
