"""Standard 5-field cron expressions (as in crontab(5)) turned into APScheduler triggers.

APScheduler's own ``from_crontab`` reads day-of-week 0 as Monday and rejects 7; cron reads 0
and 7 as Sunday, and matches *either* day field when both are restricted. As in Vixie cron
(and cronie), a day field whose text starts with ``*`` (``*``, ``*/2``) counts as unrestricted
for that rule: ``0 0 */2 * 1`` fires on odd-numbered days that are Mondays, ``0 0 1 * 1`` on
the 1st and on every Monday. Policy validation, ``plan`` and the live loop's schedule windows
(``stages.overrides.last_start``) all use this one translation so they can never disagree.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from nomadscale.core.errors import InputError

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_ITEM = re.compile(r"^(\*|\d+)(?:-(\d+))?(?:/(\d+))?$")


def _cron_dow(field: str, where: str) -> str:
    """Translate a cron day-of-week field to APScheduler names (APScheduler's 0 is Monday)."""
    out: list[str] = []
    for item in field.lower().split(","):
        m = _DOW_ITEM.match(item)
        if not m:
            out.append(item)  # names (mon-fri) mean the same to APScheduler
            continue
        first, last, step = m.group(1), m.group(2), int(m.group(3) or 1)
        if first == "*":
            lo, hi = 0, 6
        else:
            lo = int(first)
            hi = int(last) if last is not None else (6 if m.group(3) else lo)
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi and step > 0):
            raise InputError(f"{where}: bad day of week {item!r}")
        out.extend(_DOW_NAMES[d % 7] for d in range(lo, hi + 1, step))
    return ",".join(dict.fromkeys(out))


# The Gregorian calendar's dates and weekdays repeat every 28 years (1901-2099): a cron that
# does not fire within this long never fires.
FIRE_HORIZON = timedelta(days=28 * 366)


def _restricted(field: str) -> bool:
    """A day field restricts the "either" rule unless it starts with ``*`` (Vixie cron)."""
    return not field.startswith("*")


@lru_cache(maxsize=256)
def cron_triggers(cron: str, tz: str, name: str) -> tuple[CronTrigger, ...]:
    return _triggers(cron, tz, name, None)


def first_fire(
    cron: str, tz: str, *, after: datetime, within: timedelta = FIRE_HORIZON, name: str = "cron"
) -> datetime | None:
    """The first fire time after ``after`` and no later than ``after + within``, or None.

    ``None`` with the default horizon means the expression never fires (``0 7 31 2 *``).
    """
    best: datetime | None = None
    for trig in _triggers(cron, tz, name, after + within):
        fire = trig.get_next_fire_time(None, after)
        if fire is not None and (best is None or fire < best):
            best = fire
    return None if best is None else best.astimezone(UTC)


def _triggers(cron: str, tz: str, name: str, end: datetime | None) -> tuple[CronTrigger, ...]:
    where = f"schedule {name}"
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"{where}: unknown timezone {tz!r}") from None
    fields = cron.split()
    if len(fields) != 5:
        raise InputError(f"{where}: cron needs 5 fields (min hour dom month dow), got {cron!r}")
    minute, hour, dom, month, dow = fields
    dow_ap = _cron_dow(dow, where)
    try:
        if _restricted(dom) and _restricted(dow):  # cron matches either field: one trigger each
            return (
                CronTrigger(
                    minute=minute, hour=hour, day=dom, month=month, timezone=zone, end_date=end
                ),
                CronTrigger(
                    minute=minute,
                    hour=hour,
                    month=month,
                    day_of_week=dow_ap,
                    timezone=zone,
                    end_date=end,
                ),
            )
        return (
            CronTrigger(
                minute=minute,
                hour=hour,
                day=dom,
                month=month,
                day_of_week=dow_ap,
                timezone=zone,
                end_date=end,
            ),
        )
    except ValueError as e:
        raise InputError(f"{where}: bad cron {cron!r}: {e}") from None
