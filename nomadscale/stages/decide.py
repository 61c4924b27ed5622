"""The decision pipeline: the one function the live loop, ``plan``, ``simulate`` and
``backtest`` all call.

    forecast -> size (bounds, step limits, cooldown, never down on missing data)
             -> business-hours minimum -> overrides and active schedules -> zone split

Pure: ``now`` is passed in, no I/O. ``policy`` is a ``config.policy.Policy``; the small
adapters ``forecast_config_from``, ``lookback_s`` and ``bounds_from`` turn it into the stage
configs (every forecast of a policy, wherever it is made, uses the first two).

An active pause holds the current count (reason ``paused``). The business-hours minimum is
capped at ``bounds.max``; overrides (operator intent) are applied after it and may go beyond
the bounds. Overrides for other policies are ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, time
from typing import TYPE_CHECKING, Any

from nomadscale.core.clock import utc
from nomadscale.core.ports import DemandSeries
from nomadscale.core.values import Decision, Direction, Forecast, ZoneCount
from nomadscale.stages.forecast import BusinessHours, ForecastConfig, forecast
from nomadscale.stages.overrides import Override, active_schedules, apply_overrides, paused
from nomadscale.stages.sizing import Bounds, size
from nomadscale.stages.zones import ZoneSplit, split

if TYPE_CHECKING:
    from nomadscale.config.policy import Policy

# demand history a forecast reads when the source has no ``lookback`` (a trace): 5 weeks
DEFAULT_LOOKBACK_S = 35 * 86400.0

_DAY = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def _clock(minute: int) -> time:
    if minute >= 24 * 60:
        return time.max  # "24:00": until the end of the day
    return time(minute // 60, minute % 60)


def forecast_config_from(policy: Policy) -> ForecastConfig:
    """The policy's forecast config, the only one: the live loop, ``plan`` and ``simulate``
    (``decide`` and the service's kept forecasters), the ``forecast`` command and the deploy
    preflight all forecast with it, so that they all size from the same upper bound.

    Headroom is calibrated on whole workers (what sizing provisions), as the backtest does:
    the policy knows each worker's capacity and the fleet minimum, so the bound needs only to
    reach the next whole worker, and it grows with the square root of demand
    (``ForecastConfig.noise_exponent``) rather than in proportion. The upper bound is floored
    at the point forecast (on flat demand at an exact multiple of the capacity the calibrated
    multiplier alone would sit just below it)."""
    spec = policy.forecast
    bh = None
    if spec.business_hours is not None:
        b = spec.business_hours
        bh = BusinessHours(
            days=tuple(_DAY[d] for d in b.days),
            start=_clock(b.start_minute),
            end=_clock(b.end_minute),
            tz=b.timezone,
            target=b.target_availability,
            min_workers=b.min_workers,
        )
    return ForecastConfig(
        cycle_s=policy.cycle_s,
        lead_s=policy.lead_time_s,
        target=spec.target_availability,
        model=spec.model,
        business_hours=bh,
        capacity_rpm=policy.capacity.rpm_per_worker,
        min_workers=policy.bounds.min,
    )


def lookback_s(policy: Policy) -> float:
    """Seconds of demand history every forecast of ``policy`` is made from."""
    return float(getattr(policy.demand, "lookback_s", DEFAULT_LOOKBACK_S))


def bounds_from(policy: Policy) -> Bounds:
    b = policy.bounds
    return Bounds(
        min=b.min,
        max=b.max,
        max_step_up=b.max_step_up,
        max_step_down=b.max_step_down,
        scale_down_cooldown_s=b.scale_down_cooldown_s,
    )


def zone_split_for(
    policy: Policy,
    total: int,
    *,
    zone_capacity: Mapping[str, int | None] | None = None,
    degraded: Collection[str] = frozenset(),
) -> ZoneSplit:
    items = policy.zones.items
    return split(
        total,
        zones=[z.name for z in items],
        groups=[z.group for z in items],
        healthy_capacity=zone_capacity,
        degraded=degraded,
    )


def _held_zones(
    policy: Policy, current: int, current_zones: Mapping[str, int] | None, fallback: ZoneSplit
) -> tuple[ZoneCount, ...]:
    """While paused: keep the zone counts as they are when they are known and consistent."""
    items = policy.zones.items
    if current_zones is not None and sum(current_zones.get(z.name, 0) for z in items) == current:
        return tuple(
            ZoneCount(zone=z.name, count=current_zones.get(z.name, 0), group=z.group) for z in items
        )
    return fallback.counts


def decide(
    *,
    policy: Policy,
    series: DemandSeries,
    now: datetime,
    current: int | None,
    current_zones: Mapping[str, int] | None,
    last_scale_at: datetime | None,
    overrides: Sequence[Override] = (),
    zone_capacity: Mapping[str, int | None] | None = None,
    degraded: frozenset[str] = frozenset(),
    precomputed: Forecast | None = None,
) -> Decision:
    """One cycle's decision for ``policy`` at ``now``; explains itself in one line.
    ``precomputed``: the forecast of ``series`` at ``now`` when the caller already has it
    (the live service keeps an incremental forecaster per policy)."""
    now = utc(now)
    cfg = forecast_config_from(policy)
    bounds = bounds_from(policy)
    rpm = policy.capacity.rpm_per_worker
    fc = precomputed if precomputed is not None else forecast(series, now=now, config=cfg)
    sized = size(
        forecast=fc,
        capacity_rpm=rpm,
        current=current,
        bounds=bounds,
        now=now,
        last_scale_at=None if last_scale_at is None else utc(last_scale_at),
    )
    count = sized.count
    hit = list(sized.bounds_hit)
    reasons = [sized.reason]

    bh = cfg.business_hours
    if bh is not None and bh.min_workers is not None and bh.in_hours(now):
        floor = min(bh.min_workers, bounds.max)
        if count < floor:
            reasons.append(f"business hours: at least {floor} ({count} -> {floor})")
            count = floor
            hit.append("business_hours_min")

    live = [o for o in overrides if o.policy in ("", policy.name)]
    live += active_schedules(policy.schedules, now=now, policy=policy.name)
    meta: dict[str, Any] = {
        "model": fc.model,
        "headroom": fc.headroom,
        "capacity_per_worker": rpm,
        "raw": sized.raw,
        "sized": sized.count,
        "data_ok": fc.data_ok,
    }

    pause = paused(live, now=now)
    if pause is not None:
        desired = current if current is not None else count
        fallback = zone_split_for(policy, desired, zone_capacity=zone_capacity, degraded=degraded)
        zones = (
            _held_zones(policy, desired, current_zones, fallback)
            if current is not None
            else fallback.counts
        )
        meta.update(moved=0, unplaced=0, zone_note="", would_be=count)
        return Decision(
            policy=policy.name,
            decided_at=now,
            desired=desired,
            current=current,
            direction=Direction.of(current, desired),
            reason="paused" if current is not None else "paused (current count unknown)",
            zones=zones,
            forecast=fc,
            bounds_hit=tuple(hit),
            override=pause.label(),
            meta=meta,
        )

    count, override = apply_overrides(count, live, now=now)
    zs = zone_split_for(policy, count, zone_capacity=zone_capacity, degraded=degraded)
    if zs.note:
        reasons.append(f"zones: {zs.note}")
    meta.update(moved=zs.moved, unplaced=zs.unplaced, zone_note=zs.note)
    if current_zones is not None:
        meta["zones_changed"] = any(current_zones.get(z.zone, 0) != z.count for z in zs.counts)
    return Decision(
        policy=policy.name,
        decided_at=now,
        desired=count,
        current=current,
        direction=Direction.of(current, count),
        reason="; ".join(reasons),
        zones=zs.counts,
        forecast=fc,
        bounds_hit=tuple(hit),
        override=override,
        meta=meta,
    )
