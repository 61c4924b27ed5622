"""Standard 5-field cron expressions (as in crontab(5)) turned into APScheduler triggers.

APScheduler's own ``from_crontab`` reads day-of-week 0 as Monday and rejects 7; cron reads 0
and 7 as Sunday, and matches *either* day field when both are restricted. Policy validation
and the schedule evaluation both use this one translation so they can never disagree.
"""

from __future__ import annotations

import re
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


@lru_cache(maxsize=256)
def cron_triggers(cron: str, tz: str, name: str) -> tuple[CronTrigger, ...]:
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
        if dom != "*" and dow != "*":  # cron matches either field; build one trigger per field
            return (
                CronTrigger(minute=minute, hour=hour, day=dom, month=month, timezone=zone),
                CronTrigger(
                    minute=minute, hour=hour, month=month, day_of_week=dow_ap, timezone=zone
                ),
            )
        return (
            CronTrigger(
                minute=minute, hour=hour, day=dom, month=month, day_of_week=dow_ap, timezone=zone
            ),
        )
    except ValueError as e:
        raise InputError(f"{where}: bad cron {cron!r}: {e}") from None
