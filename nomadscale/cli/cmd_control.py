"""Manual control commands: override, pause, resume, scale.

Manual control lives in Consul KV (check-and-set, audited with who/when/why/expiry); the
leader picks it up on its next cycle, or at once with ``--now`` (a "kick" key it watches).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click

from nomadscale.cli.service_common import consul_kv, get_settings, policies_for
from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.core.durations import parse_duration
from nomadscale.core.errors import UsageError
from nomadscale.service.control import Control

# --- helpers ------------------------------------------------------------------------------


def _control(settings: Settings) -> Control:
    return Control(consul_kv(settings), prefix=settings.kv_prefix)


def _duration(text: str | None, option: str) -> timedelta | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _known_policy(settings: Settings, name: str) -> None:
    """Refuse an unknown policy name when the policies folder can be read."""
    if not Path(settings.policies).exists():
        return
    names = {p.name for p in policies_for(settings)}
    if names and name not in names:
        raise UsageError(f"policy {name!r}: unknown (known: {', '.join(sorted(names))})")


def _kick(control: Control, policy: str, reason: str) -> None:
    kid = control.request_kick(policy, reason=reason, now=SystemClock().now())
    click.echo(f"asked the leader to apply {policy} now (kick {kid})")


# --- manual control -----------------------------------------------------------------------


@click.group("override")
def override() -> None:
    """Set, list and clear manual overrides (stored in Consul KV)."""


@override.command("set")
@click.argument("policy")
@click.option("--min", "min_", type=click.IntRange(min=0))
@click.option("--max", "max_", type=click.IntRange(min=0))
@click.option("--fixed", type=click.IntRange(min=0))
@click.option("--for", "for_", default=None, help="How long, e.g. 2h (default: until cleared).")
@click.option("--reason", required=True, help="Why (recorded with the override).")
@click.option("--now", "apply_now", is_flag=True, help="Ask the leader to apply it at once.")
def override_set(
    policy: str, min_: int | None, max_: int | None, fixed: int | None, for_: str | None,
    reason: str, apply_now: bool,
) -> None:  # fmt: skip
    """Override POLICY's worker count: --min N, --max N or --fixed N."""
    given = [(k, v) for k, v in (("min", min_), ("max", max_), ("fixed", fixed)) if v is not None]
    if len(given) != 1:
        raise UsageError("override set: give exactly one of --min, --max, --fixed")
    settings = get_settings()
    _known_policy(settings, policy)
    control = _control(settings)
    kind, value = given[0]
    o = control.set_override(policy, kind=kind, value=value, reason=reason,
                             now=SystemClock().now(), duration=_duration(for_, "--for"))  # fmt: skip
    until = o.expires_at.isoformat(timespec="seconds") if o.expires_at else "cleared"
    click.echo(f"{policy}: override {o.label()} until {until}: {o.reason}")
    if apply_now:
        _kick(control, policy, f"override {o.label()}")


@override.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include expired entries.")
def override_list(as_json: bool, show_all: bool) -> None:
    """Active overrides and pauses of every policy."""
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
        until = o.expires_at.isoformat(timespec="seconds") if o.expires_at else "until cleared"
        click.echo(f"{o.policy}: {o.label()} since {o.created_at.isoformat(timespec='seconds')} "
                   f"until {until}: {o.reason}")  # fmt: skip


@override.command("clear")
@click.argument("policy")
def override_clear(policy: str) -> None:
    """Remove every override (and pause) of POLICY."""
    n = _control(get_settings()).clear(policy, now=SystemClock().now())
    click.echo(f"{policy}: cleared {n} override(s)")


@click.command("pause")
@click.argument("policy", required=False)
@click.option("--reason", default="paused by operator", show_default=True)
@click.option("--for", "for_", default=None, help="How long, e.g. 1h (default: until resumed).")
def pause(policy: str | None, reason: str, for_: str | None) -> None:
    """Stop scaling POLICY (all policies without one) until resumed."""
    settings = get_settings()
    if policy:
        _known_policy(settings, policy)
    o = _control(settings).pause(policy, reason=reason, now=SystemClock().now(),
                                 duration=_duration(for_, "--for"))  # fmt: skip
    click.echo(f"{policy or 'all policies'}: paused ({o.who}): {reason}")


@click.command("resume")
@click.argument("policy", required=False)
def resume(policy: str | None) -> None:
    """Undo ``pause`` for POLICY (all policies without one)."""
    n = _control(get_settings()).resume(policy, now=SystemClock().now())
    click.echo(f"{policy or 'all policies'}: resumed ({n} pause(s) removed)")


@click.command("scale")
@click.argument("policy")
@click.option("--count", type=click.IntRange(min=0), required=True)
@click.option("--reason", required=True)
@click.option("--for", "for_", default="1h", show_default=True, help="How long to hold it.")
@click.option("--now", "apply_now", is_flag=True, help="Ask the leader to apply it at once.")
def scale(policy: str, count: int, reason: str, for_: str, apply_now: bool) -> None:
    """Hold POLICY at COUNT workers for a while (a fixed override)."""
    settings = get_settings()
    _known_policy(settings, policy)
    control = _control(settings)
    o = control.set_override(policy, kind="fixed", value=count, reason=reason, source="scale",
                             now=SystemClock().now(), duration=_duration(for_, "--for"))  # fmt: skip
    click.echo(f"{policy}: held at {count} until {o.expires_at:%Y-%m-%d %H:%M} UTC: {reason}")
    if apply_now:
        _kick(control, policy, f"scale to {count}")


COMMANDS: list[click.Command] = [override, pause, resume, scale]

__all__ = ["COMMANDS"]
