"""When cycles fire, and whether the leader lock's timing fits them.

* ``cron_for``: APScheduler cron fields that fire every cycle, aligned to midnight UTC
  (``cycle: 20m`` -> ``minute="*/20"``), so every replica computes the same slots.
* ``check_timing``: the lock must be renewable within its TTL, and a failover (TTL expiry)
  must complete within one cycle; checked once at load time, every error reported.
"""

from __future__ import annotations

from collections.abc import Sequence

from apscheduler.triggers.cron import CronTrigger

from nomadscale.config.policy import Policy
from nomadscale.core.errors import ConfigError
from nomadscale.integrations.consul import validate_timing


def cron_for(cycle_s: float) -> dict[str, str]:
    """CronTrigger fields firing every ``cycle_s`` aligned to midnight UTC."""
    if cycle_s < 60:  # tests and demos only: policies allow whole minutes
        secs = int(cycle_s)
        if secs <= 0 or 60 % secs:
            raise ConfigError(f"cycle {cycle_s:g}s: must divide a minute")
        return {"second": f"*/{secs}"}
    minutes = int(cycle_s // 60)
    if minutes <= 0 or 1440 % minutes:
        raise ConfigError(f"cycle {cycle_s:g}s: must be whole minutes dividing a day")
    if minutes < 60:
        return {"minute": f"*/{minutes}", "second": "0"}
    if minutes % 60 == 0:
        return {"hour": f"*/{minutes // 60}", "minute": "0", "second": "0"}
    raise ConfigError(f"cycle {cycle_s:g}s: use minutes below 1h or whole hours")


def trigger_for(cycle_s: float) -> CronTrigger:
    return CronTrigger(timezone="UTC", **cron_for(cycle_s))  # type: ignore[arg-type]


def check_timing(
    policies: Sequence[Policy], *, ttl_s: float, renew_s: float, timeout_s: float = 5.0
) -> None:
    """ConfigError unless the lock can be kept and a failover fits within one cycle."""
    errors: list[str] = []
    try:
        validate_timing(ttl_s=ttl_s, renew_every_s=renew_s, timeout_s=timeout_s)
    except ConfigError as e:
        errors.extend(e.errors)
    for p in policies:
        if p.cycle_s < 2 * ttl_s:
            errors.append(
                f"policy {p.name}: cycle {p.cycle_s:g}s must be at least 2 x the lock ttl "
                f"({2 * ttl_s:g}s) so a failover completes within one cycle"
            )
    if errors:
        raise ConfigError("; ".join(errors), errors=errors)
