"""Manual control commands: override, pause, resume, scale.

Manual control lives in Consul KV (check-and-set, audited with who/when/why/expiry); the
leader picks it up on its next cycle, or at once with ``--now`` (a "kick" key it watches).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import yaml
from pydantic import TypeAdapter, ValidationError

from nomadscale.cli.service_common import consul_kv, get_settings
from nomadscale.config.policy import Policy
from nomadscale.config.policy_fields import Name
from nomadscale.config.settings import Settings
from nomadscale.config.validate import check_paths
from nomadscale.core.clock import SystemClock
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import UsageError
from nomadscale.service.control import ALL, Control
from nomadscale.stages.overrides import Override

# --- helpers ------------------------------------------------------------------------------

MAX_FOR = timedelta(days=3650)  # like a policy's durations; longer is a typo (500000w)


_NAME: TypeAdapter[str] = TypeAdapter(Name)


def _policy_arg(name: str) -> str:
    """POLICY as a policy's ``name:`` spells it. It becomes part of a Consul KV key
    (``<prefix>/overrides/<name>``): ``../leader`` must never reach the leader lock's key."""
    try:
        return _NAME.validate_python(name)
    except ValidationError as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(f"POLICY: not a policy name: {why}") from None


def _control(settings: Settings) -> Control:
    return Control(consul_kv(settings), prefix=settings.kv_prefix)


def _duration(text: str | None, option: str) -> timedelta | None:
    if text is None:
        return None
    bare = text.strip()
    if bare and all(c.isdigit() or c == "." for c in bare):
        raise UsageError(f"{option}: {text!r} has no unit (write e.g. {bare}s, {bare}m or {bare}h)")
    try:
        td = parse_duration(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None
    if td > MAX_FOR:
        raise UsageError(f"{option}: too long: {text!r} (at most {MAX_FOR.days}d)")
    return td


def _when(dt: datetime) -> str:
    """``2026-11-22 12:22 UTC``, with the local time too when this host is not on UTC."""
    utc = dt.astimezone(UTC)
    text = f"{utc:%Y-%m-%d %H:%M:%S} UTC"
    local = dt.astimezone()
    if local.utcoffset() != timedelta(0):
        day = "" if local.date() == utc.date() else f"{local:%Y-%m-%d} "
        text += f" ({day}{local:%H:%M:%S %z} local)"
    return text


def _until(o: Override, now: datetime, *, ended_by: str) -> str:
    """When ``o`` ends: a time and how long from now, or how to end it when it has no end."""
    if o.expires_at is None:
        return f"with no end (no --for given; only {ended_by} ends it)"
    return f"until {_when(o.expires_at)}, in {format_duration(o.expires_at - now)}"


def _known_policies(settings: Settings) -> dict[str, Policy | None] | None:
    """Policy names this host knows: from the policies folder (a policy whose file is invalid
    still counts, by its ``name:``), else None when the folder cannot be read."""
    try:
        if not Path(settings.policies).is_dir():
            return None
        _, results = check_paths([settings.policies])
    except OSError:
        return None
    known: dict[str, Policy | None] = {}
    for f, pol, _errs in results:
        if pol is not None:
            known[pol.name] = pol
            continue
        try:  # an invalid file still names its policy: a pause must not need a valid file
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            known.setdefault(data["name"], None)
    return known


def _known_policy(settings: Settings, name: str, control: Control) -> Policy | None:
    """Refuse an unknown policy name; the policy when its file is valid.

    Known names come from the policies folder, else (an operator's laptop without it) from
    the policies the service has run (Consul KV); with neither, a warning says so.
    """
    known = _known_policies(settings)
    where = settings.policies
    if not known:
        running = {e.key.rsplit("/", 1)[-1] for e in control.kv.list(f"{control.prefix}/slots/")}
        if running:
            known, where = dict.fromkeys(running), "the service's Consul KV"
    if not known:
        click.echo(f"warning: cannot check the policy name {name!r}: no policies in "
                   f"{settings.policies} (set NOMADSCALE_POLICIES)", err=True)  # fmt: skip
        return None
    if name not in known:
        raise UsageError(f"policy {name!r}: unknown in {where} (known: {', '.join(sorted(known))})")
    return known[name]


def _bounds_note(pol: Policy | None, kind: str, value: int) -> None:
    """Say so when an override goes beyond the policy's bounds (it is applied as given)."""
    if pol is None:
        return
    lo, hi = pol.bounds.min, pol.bounds.max
    if kind in ("fixed", "min") and value > hi:
        beyond = f"above bounds.max {hi}"
    elif kind in ("fixed", "max") and value < lo:
        beyond = f"below bounds.min {lo}"
    else:
        return
    click.echo(f"note: {kind} {value} is {beyond} of {pol.name}; overrides are applied "
               "beyond the policy's bounds, as given", err=True)  # fmt: skip


def _kick(control: Control, policy: str, reason: str) -> None:
    kid = control.request_kick(policy, reason=reason, now=SystemClock().now())
    rollout = control.deploy_active(policy)
    if rollout:  # the cycle holds the policy while a rollout runs (the kick is retried)
        click.echo(f"asked the leader to apply {policy} (kick {kid}): a {rollout} holds it, "
                   "so it applies once the rollout ends")  # fmt: skip
        return
    click.echo(f"asked the leader to apply {policy} now (kick {kid})")


def _name(policy: str) -> str:
    return "all policies" if policy == ALL else policy


# --- manual control -----------------------------------------------------------------------


@click.group("override")
def override() -> None:
    """Set, list and clear manual overrides (stored in Consul KV)."""


@override.command("set")
@click.argument("policy")
@click.option("--min", "min_", type=click.IntRange(min=0))
@click.option("--max", "max_", type=click.IntRange(min=0))
@click.option("--fixed", type=click.IntRange(min=0))
@click.option("--for", "for_", default=None,
              help="How long, e.g. 90m, 2h, 1d (default: until cleared).")  # fmt: skip
@click.option("--reason", required=True, help="Why (recorded with the override).")
@click.option("--now", "apply_now", is_flag=True, help="Ask the leader to apply it at once.")
def override_set(
    policy: str, min_: int | None, max_: int | None, fixed: int | None, for_: str | None,
    reason: str, apply_now: bool,
) -> None:  # fmt: skip
    """Override POLICY's worker count: --min N, --max N or --fixed N.

    Overrides are applied as given, beyond the policy's bounds too (a note says so)."""
    policy = _policy_arg(policy)
    given = [(k, v) for k, v in (("min", min_), ("max", max_), ("fixed", fixed)) if v is not None]
    if len(given) != 1:
        raise UsageError("override set: give exactly one of --min, --max, --fixed")
    duration = _duration(for_, "--for")
    settings = get_settings()
    control = _control(settings)
    pol = _known_policy(settings, policy, control)
    kind, value = given[0]
    now = SystemClock().now()
    o = control.set_override(policy, kind=kind, value=value, reason=reason, now=now,
                             duration=duration)  # fmt: skip
    ended = f"`nomadscale override clear {policy}`"
    click.echo(f"{policy}: override {o.label()} {_until(o, now, ended_by=ended)}: {o.reason}")
    _bounds_note(pol, kind, value)
    if apply_now:
        _kick(control, policy, f"override {o.label()}")


@override.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include expired entries.")
def override_list(as_json: bool, show_all: bool) -> None:
    """Active overrides and pauses of every policy (times in UTC)."""
    control = _control(get_settings())
    now = SystemClock().now()
    items = control.all_overrides(now=None if show_all else now)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in items], indent=2))
        return
    if not items:
        click.echo("no overrides")
        return
    for o in items:
        if o.expires_at is None:
            until = "until cleared"
        elif o.expires_at <= now:
            until = f"expired {_when(o.expires_at)}"
        else:
            until = f"until {_when(o.expires_at)} (in {format_duration(o.expires_at - now)})"
        click.echo(f"{_name(o.policy)}: {o.label()} since {_when(o.created_at)} "
                   f"{until}: {o.reason}")  # fmt: skip


def _still_paused(control: Control, policy: str, now: datetime) -> None:
    """After removing POLICY's own pauses: fail loudly when a pause of all policies holds it."""
    if policy == ALL:
        return
    held = control.paused(policy, now=now)
    if held is not None:
        click.echo(f"error: {policy} is still paused by the pause of all policies "
                   f"({held.label()}: {held.reason}); `nomadscale resume` ends it", err=True)  # fmt: skip
        raise SystemExit(1)


@override.command("clear")
@click.argument("policy")
def override_clear(policy: str) -> None:
    """Remove every override (and pause) of POLICY.

    Exits 0 when POLICY is left unpaused, 1 when a pause of all policies still holds it (or
    Consul KV fails), 2 for a name that is not a known policy."""
    policy = _policy_arg(policy)
    settings = get_settings()
    control = _control(settings)
    if control.kv.get(control.overrides_key(policy)) is None:  # leftovers can always be cleared
        _known_policy(settings, policy, control)
    now = SystemClock().now()
    n = control.clear(policy, now=now)
    click.echo(f"{_name(policy)}: cleared {n} override(s)")
    _still_paused(control, policy, now)


@click.command("pause")
@click.argument("policy", required=False)
@click.option("--reason", default="paused by operator", show_default=True)
@click.option("--for", "for_", default=None,
              help="How long, e.g. 30m, 1h (default: until resumed).")  # fmt: skip
def pause(policy: str | None, reason: str, for_: str | None) -> None:
    """Stop scaling POLICY (all policies without one) until resumed or --for has passed."""
    policy = _policy_arg(policy) if policy is not None else None
    duration = _duration(for_, "--for")
    settings = get_settings()
    control = _control(settings)
    if policy:
        _known_policy(settings, policy, control)
    now = SystemClock().now()
    o = control.pause(policy, reason=reason, now=now, duration=duration)
    ended = f"`nomadscale resume{' ' + policy if policy else ''}`"
    click.echo(f"{policy or 'all policies'}: paused {_until(o, now, ended_by=ended)} "
               f"({o.who}): {o.reason}")  # fmt: skip


@click.command("resume")
@click.argument("policy", required=False)
def resume(policy: str | None) -> None:
    """Undo ``pause`` for POLICY (all policies without one).

    Exits 0 when POLICY is left unpaused, 1 when a pause of all policies still holds it (or
    Consul KV fails), 2 for a name that is not a known policy."""
    policy = _policy_arg(policy) if policy is not None else None
    settings = get_settings()
    control = _control(settings)
    if policy and control.kv.get(control.overrides_key(policy)) is None:
        _known_policy(settings, policy, control)
    now = SystemClock().now()
    n = control.resume(policy, now=now)
    click.echo(f"{policy or 'all policies'}: resumed ({n} pause(s) removed)")
    if policy:
        _still_paused(control, policy, now)


@click.command("scale")
@click.argument("policy")
@click.option("--count", type=click.IntRange(min=0), required=True)
@click.option("--reason", required=True)
@click.option("--for", "for_", default="1h", show_default=True, help="How long to hold it.")
@click.option("--now", "apply_now", is_flag=True, help="Ask the leader to apply it at once.")
def scale(policy: str, count: int, reason: str, for_: str, apply_now: bool) -> None:
    """Hold POLICY at COUNT workers for a while (a fixed override, beyond the bounds too)."""
    policy = _policy_arg(policy)
    duration = _duration(for_, "--for")
    settings = get_settings()
    control = _control(settings)
    pol = _known_policy(settings, policy, control)
    now = SystemClock().now()
    o = control.set_override(policy, kind="fixed", value=count, reason=reason, source="scale",
                             now=now, duration=duration)  # fmt: skip
    click.echo(
        f"{policy}: held at {count} {_until(o, now, ended_by=f'`nomadscale override clear {policy}`')}: {o.reason}"
    )
    _bounds_note(pol, "fixed", count)
    if apply_now:
        _kick(control, policy, f"scale to {count}")


COMMANDS: list[click.Command] = [override, pause, resume, scale]

__all__ = ["COMMANDS"]
