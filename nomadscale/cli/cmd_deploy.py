"""``nomadscale deploy`` and ``nomadscale prefetch``: rolling golden-image deployments.

    nomadscale deploy start ekyc-ml --image registry/ml-worker:2026.11.2 [--dry-run] [--yes]
    nomadscale deploy status [ekyc-ml]      nomadscale deploy abort ekyc-ml
    nomadscale deploy resume ekyc-ml        nomadscale prefetch ekyc-ml --image REF

POLICY is a policy name (looked up in the settings' policies folder) or a policy file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from nomadscale.config.policy import Policy, load_policies, load_policy
from nomadscale.config.settings import load_settings
from nomadscale.core.clock import SystemClock
from nomadscale.core.errors import ConfigError, InputError, UsageError
from nomadscale.deploy.image import parse_image
from nomadscale.deploy.prefetch import ensure_prefetch_job
from nomadscale.deploy.prefetch import prefetch as run_prefetch
from nomadscale.deploy.progress import LiveProgress, status_table
from nomadscale.deploy.rollout import NothingToDo, Rollout
from nomadscale.deploy.state import StateStore, phase_text


def _policy(name: str, settings: Any) -> Policy:
    if Path(name).is_file():
        return load_policy(name)
    for p in load_policies([settings.policies]):
        if p.name == name:
            if p.deploy is None:
                raise UsageError(f"POLICY {name}: the policy has no 'deploy:' section")
            return p
    raise UsageError(f"POLICY {name!r}: no such policy in {settings.policies}")


def _ports(
    policy: Policy | None, *, need_demand: bool = False, need_kv: bool = True
) -> dict[str, Any]:
    """Nomad, Consul KV and the policy's other ports. Without ``need_kv`` (a dry run reads
    no rollout state it could not plan without) a missing CONSUL_HTTP_ADDR gives an empty
    in-memory KV."""
    from nomadscale.integrations.consul import ConsulKV
    from nomadscale.integrations.memkv import MemoryKV
    from nomadscale.integrations.nomad import NomadClient
    from nomadscale.service.runtime import alerts_for, demand_for

    settings = load_settings()
    if not settings.consul_addr and need_kv:
        raise ConfigError("CONSUL_HTTP_ADDR: not set (rollout state lives in Consul KV)")
    token = settings.consul_token.reveal() if settings.consul_token else None
    out: dict[str, Any] = {
        "settings": settings,
        "nomad": NomadClient.from_settings(settings, clock=SystemClock()),
        "kv": (
            ConsulKV(addr=settings.consul_addr, token=token, cacert=settings.consul_cacert)
            if settings.consul_addr
            else MemoryKV()
        ),
        "prefix": settings.kv_prefix,
    }
    if policy is not None:
        out["alerts"] = alerts_for([policy])
        if need_demand:
            out["demand"] = demand_for(settings)(policy)
    return out


def _rollout(
    name: str,
    *,
    reporter: Any = None,
    need_demand: bool = False,
    gated: bool = False,
    need_kv: bool = True,
) -> Rollout:
    """The policy's rollout; ``gated``: it is driven (start, resume), so the policy's SLI gate
    needs Prometheus (without it the canary would be promoted on health alone). Without
    ``need_kv`` (a dry run) it may have no Consul: its KV is then an empty one in memory."""
    from nomadscale.service.runtime import rollout_prometheus

    settings = load_settings()
    policy = _policy(name, settings)
    prometheus = rollout_prometheus(settings, policy, gated=gated)
    p = _ports(policy, need_demand=need_demand, need_kv=need_kv)
    return Rollout(
        policy=policy, nomad=p["nomad"], kv=p["kv"], clock=SystemClock(), prefix=p["prefix"],
        prometheus=prometheus, demand=p.get("demand"), alerts=p.get("alerts"),
        reporter=reporter,
    )  # fmt: skip


def _done(st: Any, console: Console, *, ok: str = "completed") -> None:
    """Print the record; exit 1 unless the rollout ended ``ok``."""
    console.print(status_table(st))
    if st.status != ok:
        raise click.exceptions.Exit(1)


def _running(r: Rollout, policy: str, *, doing: str) -> None:
    """UsageError when ``policy`` has no rollout recorded, InputError when its last one
    already ended (nothing to ``doing``)."""
    st = r.status()
    if st is None:
        raise UsageError(f"POLICY {policy}: no rollout recorded")
    if not st.active:
        raise InputError(
            f"deploy {policy}: nothing to {doing}: rollout {st.id} of {st.image} already "
            f"ended {st.status} ({st.reason})"
        )


class _DefaultStart(click.Group):
    """``deploy POLICY --image ...`` means ``deploy start POLICY --image ...``."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_DefaultStart)
def deploy() -> None:
    """Rolling golden-image deployments (prefetch, canary, one node at a time)."""


@deploy.command("start")
@click.argument("policy")
@click.option("--image", required=True, help="REPO:TAG or REPO@sha256:<digest>")
@click.option("--dry-run", is_flag=True, help="Preflight only: print the plan.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-prefetch", is_flag=True, help="Let nodes pull during the rollout.")
def start(policy: str, image: str, dry_run: bool, yes: bool, no_prefetch: bool) -> None:
    """Start a rollout of IMAGE for POLICY."""
    ref = parse_image(image).ref
    console = Console()
    if dry_run:
        # planning reads Nomad and the demand only: without Consul it says what it could not
        # check (whether another rollout runs) instead of refusing
        r = _rollout(policy, need_demand=True, gated=True, need_kv=False)
        if r.runs_already(ref):
            click.echo(f"deploy {policy}: every zone group already runs {ref}: nothing to do")
            return
        plan = r.plan(ref, prefetch=not no_prefetch)
        console.print(f"deploy {policy} {ref}: {plan.explain()}")
        if not load_settings().consul_addr:
            console.print("CONSUL_HTTP_ADDR not set: whether another rollout runs was not "
                          "checked (a start needs Consul)")  # fmt: skip
            return
        old = r.status()
        if old is not None and old.active:  # the plan is right, the start would be refused
            raise InputError(
                f"deploy {policy}: rollout {old.id} of {old.image} is {phase_text(old.status)}: "
                "a start is refused until it ends ('deploy resume' or 'deploy abort')"
            )
        return
    r = _rollout(policy, need_demand=True, gated=True)
    if r.runs_already(ref):  # before the confirmation: there is nothing to confirm
        click.echo(f"deploy {policy}: every zone group already runs {ref}: nothing to do")
        return
    if not yes:
        click.confirm(f"Roll out {ref} to {policy}?", abort=True)
    try:
        with LiveProgress() as live:
            r.reporter = live
            st = r.start(ref, prefetch=not no_prefetch)
    except NothingToDo as e:  # it ran it by the time the start looked again
        click.echo(str(e))
        return
    _done(st, console)


@deploy.command("status")
@click.argument("policy", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document: POLICY's record (null when none), else a list of every "
                   "policy's record.")  # fmt: skip
def status(policy: str | None, as_json: bool) -> None:
    """Show the rollout record of POLICY (or of every policy)."""
    p = _ports(None)
    store = StateStore(p["kv"], prefix=p["prefix"])
    named = bool(policy) and not Path(str(policy)).is_file()
    if policy and not named:  # a policy file, as the other deploy commands take
        policy = load_policy(policy).name
    names = [policy] if policy else sorted(
        {e.key.split("/")[-2] for e in p["kv"].list(f"{p['prefix'].strip('/')}/deploy/")}
    )  # fmt: skip
    console = Console()
    records = {name: store.load(name)[0] for name in names}
    if named and policy and records[policy] is None:  # a name no policy has: a usage error
        settings = p["settings"]
        if not any(x.name == policy for x in load_policies([settings.policies])):
            raise UsageError(f"POLICY {policy!r}: no such policy in {settings.policies}")
    if as_json:
        docs = [None if st is None else st.to_dict() for st in records.values()]
        click.echo(json.dumps(docs[0] if policy else [d for d in docs if d], indent=2))
        return
    if not names:
        console.print("no rollout recorded")
    for name, st in records.items():
        if st is None:
            console.print(f"{name}: no rollout recorded")
        else:
            console.print(status_table(st, now=SystemClock().now()))


@deploy.command("abort")
@click.argument("policy")
def abort(policy: str) -> None:
    """Fail the running deployment (auto-revert), roll back and release the surge.

    Exits 0 once the rollout is aborted and rolled back, 1 when it could not be (paused, say
    Nomad unreachable: run it again) or the last rollout had already ended, 2 when none is
    recorded."""
    r = _rollout(policy)
    _running(r, policy, doing="abort")
    st = r.abort()
    assert st is not None
    _done(st, Console(), ok="aborted")


@deploy.command("resume")
@click.argument("policy")
def resume(policy: str) -> None:
    """Reattach to the recorded rollout and finish it (or roll it back)."""
    r = _rollout(policy, need_demand=True, gated=True)
    _running(r, policy, doing="resume")
    with LiveProgress() as live:
        r.reporter = live
        st = r.resume()
    assert st is not None
    _done(st, Console())


@click.command("prefetch")
@click.argument("policy")
@click.option("--image", required=True, help="REPO:TAG or REPO@sha256:<digest>")
def prefetch(policy: str, image: str) -> None:
    """Pull IMAGE on every eligible node of POLICY's node pools (no rollout)."""
    ref = parse_image(image).ref
    pol = _policy(policy, load_settings())
    p = _ports(pol)
    nomad, ns = p["nomad"], pol.target.namespace
    pools = sorted({z.node_pool for z in pol.zones.items})  # every zone's pool
    job = (pol.deploy.prefetch_job if pol.deploy else None) or "image-prefetch"
    ensure_prefetch_job(nomad, job_id=job, namespace=ns, node_pools=pools)
    nodes = [n for pool in pools for n in nomad.list_nodes(node_pool=pool)
             if n.status == "ready" and n.eligibility == "eligible"]  # fmt: skip
    res = run_prefetch(nomad, image=ref, nodes=nodes, job_id=job, namespace=ns,
                       clock=SystemClock(), retries=pol.deploy.prefetch_retries if pol.deploy else 2)  # fmt: skip
    click.echo(f"prefetched {ref} on {len(res.ok)}/{len(nodes)} nodes in {res.seconds:.0f}s")
    for node_id, why in sorted(res.failed.items()):
        click.echo(f"  failed on {node_id}: {why}", err=True)
    if res.failed:
        raise click.exceptions.Exit(1)
