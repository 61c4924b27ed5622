"""Image prefetch: a parameterized sysbatch job pulls the image on every eligible node.

``prefetch`` dispatches ``jobs/image-prefetch.nomad.hcl`` (registered when missing) with the
image as dispatch meta, follows each node's allocation, re-dispatches for failed nodes a
bounded number of times and records success in the node's dynamic metadata
(``nomadscale_image``), which is how nomadscale knows later which nodes hold which image.

``warm_up_new_nodes`` is the gate for nodes that join the pool after a rollout.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from nomadscale.core.clock import Clock
from nomadscale.core.errors import NotFoundError, TemporaryError
from nomadscale.core.ports import NodeInfo

log = logging.getLogger(__name__)

IMAGE_META = "nomadscale_image"
DEFAULT_HCL = Path(__file__).resolve().parents[2] / "jobs" / "image-prefetch.nomad.hcl"


@dataclass
class PrefetchResult:
    image: str
    ok: list[str] = field(default_factory=list)  # node ids holding the image
    failed: dict[str, str] = field(default_factory=dict)  # node id -> last reason
    attempts: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "ok": sorted(self.ok),
            "failed": dict(self.failed),
            "attempts": self.attempts,
            "seconds": round(self.seconds, 1),
        }


def ensure_prefetch_job(
    nomad: Any,
    *,
    job_id: str,
    namespace: str,
    node_pool: str | None = None,
    node_pools: Iterable[str] = (),
    hcl_path: Path = DEFAULT_HCL,
) -> None:
    """Register the parameterized prefetch job when it is missing, or again when it does not
    reach every pool of ``node_pools`` (plus ``node_pool``): a sysbatch job runs on the
    nodes of its own node pool only. One pool: the job is in that pool. Several (a policy
    whose zones use different pools): it is in Nomad's built-in ``all`` pool, constrained to
    those pools by ``${node.pool}``, so it pulls on no other node."""
    pools = sorted({*node_pools, *([node_pool] if node_pool else [])})
    want_pool, want_constraint = _placement(pools)
    with contextlib.suppress(NotFoundError):
        spec = dict(nomad.get_job(job_id, namespace=namespace).spec)
        if not pools or _reaches(spec, want_pool, want_constraint):
            return
        log.info("prefetch job %s in %s reaches pool %s only: registering it for %s",
                 job_id, namespace, spec.get("NodePool"), ", ".join(pools))  # fmt: skip
    spec = nomad.parse_hcl(hcl_path.read_text(encoding="utf-8"))
    spec["ID"] = spec["Name"] = job_id
    spec["Namespace"] = namespace
    if want_pool:
        spec["NodePool"] = want_pool
    if want_constraint:
        spec["Constraints"] = [*(spec.get("Constraints") or []), want_constraint]
    nomad.register_job(spec, namespace=namespace)
    log.info("registered prefetch job %s in %s (pool %s)", job_id, namespace, ", ".join(pools))


def _placement(pools: list[str]) -> tuple[str | None, dict[str, str] | None]:
    """(NodePool, extra constraint) of a prefetch job for ``pools``."""
    if len(pools) <= 1:
        return (pools[0] if pools else None), None
    rx = "^(" + "|".join(re.escape(p) for p in pools) + ")$"
    return "all", {"LTarget": "${node.pool}", "RTarget": rx, "Operand": "regexp"}


def _reaches(spec: dict[str, Any], pool: str | None, constraint: dict[str, str] | None) -> bool:
    if pool and spec.get("NodePool") != pool:
        return False
    if constraint is None:
        return True
    return any(
        all((c or {}).get(k) == v for k, v in constraint.items())
        for c in spec.get("Constraints") or []
    )


def _retrying(clock: Clock, deadline: float, fn: Callable[[], Any]) -> Any:
    while True:
        try:
            return fn()
        except TemporaryError as e:
            if clock.monotonic() >= deadline:
                raise
            log.warning("prefetch: %s; retrying in %.0fs", e, e.retry_after)
            clock.sleep(max(1.0, e.retry_after))


def prefetch(
    nomad: Any,
    *,
    image: str,
    nodes: Iterable[NodeInfo],
    job_id: str,
    namespace: str,
    clock: Clock,
    retries: int = 2,
    timeout_s: float = 1800.0,
    poll_s: float = 5.0,
    on_progress: Callable[[PrefetchResult, int], None] | None = None,
    around_dispatch: Callable[[set[str], Callable[[], str]], str] | None = None,
) -> PrefetchResult:
    """Pull ``image`` on ``nodes``; every node ends in ``ok`` or ``failed``.
    ``around_dispatch(pending node ids, dispatch)`` wraps each dispatch (warm-up opens and
    closes the nodes' eligibility around it) and returns the child job id."""
    targets = {n.id: n for n in nodes}
    result = PrefetchResult(image=image)
    started = clock.monotonic()
    pending = set(targets)
    for attempt in range(retries + 1):
        if not pending:
            break
        result.attempts = attempt + 1
        deadline = clock.monotonic() + timeout_s

        def dispatch(deadline: float = deadline) -> str:
            return str(
                _retrying(
                    clock,
                    deadline,
                    lambda: nomad.dispatch(job_id, meta={"image": image}, namespace=namespace),
                )
            )

        child = around_dispatch(set(pending), dispatch) if around_dispatch else dispatch()
        log.info(
            "prefetch %s: dispatched %s for %s node(s) (attempt %s/%s)",
            image, child, len(pending), attempt + 1, retries + 1,
        )  # fmt: skip
        pending = _follow(
            nomad,
            child,
            pending,
            result,
            namespace,
            clock,
            deadline,
            poll_s,
            lambda: on_progress(result, len(targets)) if on_progress else None,
        )
        for node_id in pending:
            log.warning(
                "prefetch %s failed on node %s (%s): %s",
                image, targets[node_id].name, node_id, result.failed.get(node_id),
            )  # fmt: skip
    for node_id in result.ok:
        try:
            nomad.set_node_metadata(node_id, {IMAGE_META: image})
        except TemporaryError as e:
            log.warning("prefetch: could not record image on node %s: %s", node_id, e)
    result.seconds = clock.monotonic() - started
    if on_progress:
        on_progress(result, len(targets))
    return result


def _follow(
    nomad: Any,
    child: str,
    pending: set[str],
    result: PrefetchResult,
    namespace: str,
    clock: Clock,
    deadline: float,
    poll_s: float,
    progress: Callable[[], Any],
) -> set[str]:
    """Wait until each pending node's allocation is terminal; returns the nodes that failed."""
    waiting = set(pending)
    failed: set[str] = set()
    while waiting:
        try:
            allocs = nomad.job_allocations(child, namespace=namespace)
        except TemporaryError as e:
            log.warning("prefetch: following %s: %s", child, e)
            allocs = None
        for a in allocs or []:
            if a.node_id not in waiting:
                continue
            if a.client_status == "complete":
                waiting.discard(a.node_id)
                result.ok.append(a.node_id)
                result.failed.pop(a.node_id, None)
            elif a.client_status in ("failed", "lost") or a.desired_status in ("stop", "evict"):
                waiting.discard(a.node_id)
                failed.add(a.node_id)
                result.failed[a.node_id] = f"allocation {a.id[:8]} {a.client_status}"
        progress()
        if not waiting:
            break
        if clock.monotonic() >= deadline:
            for node_id in waiting:
                result.failed[node_id] = "no completed pull before the timeout"
            failed |= waiting
            break
        clock.sleep(poll_s)
    return failed


def has_image(nomad: Any, node_id: str, image: str) -> bool:
    try:
        return nomad.node_metadata(node_id).meta.get(IMAGE_META) == image
    except NotFoundError:
        return False


def warm_up_new_nodes(
    nomad: Any,
    *,
    image: str,
    node_pool: str,
    job_id: str,
    namespace: str,
    clock: Clock,
    retries: int = 2,
    timeout_s: float = 1800.0,
    poll_s: float = 5.0,
) -> PrefetchResult:
    """The warm-up gate for nodes that joined the pool: every ready node of ``node_pool``
    that has no running allocation and lacks ``image`` gets the prefetch; it is marked
    eligible only once the pull succeeded and stays ineligible when it failed. Call it every
    cycle with the policy's golden image; it does nothing when every node has the image."""
    fresh = [
        n
        for n in nomad.list_nodes(node_pool=node_pool, with_allocs=True)
        if n.status == "ready" and not n.draining and n.allocs_running == 0
        and not has_image(nomad, n.id, image)
    ]  # fmt: skip
    if not fresh:
        return PrefetchResult(image=image)
    log.info("warm-up: %s new node(s) lack %s: prefetching", len(fresh), image)
    for n in fresh:
        if n.eligibility == "eligible":  # a node that joined eligible waits for its pull too
            nomad.set_eligibility(n.id, False)
    result = prefetch(
        nomad, image=image, nodes=fresh, job_id=job_id, namespace=namespace, clock=clock,
        retries=retries, timeout_s=timeout_s, poll_s=poll_s,
        around_dispatch=partial(_open_for_pull, nomad, clock, namespace),
    )  # fmt: skip
    for node_id in result.ok:
        nomad.set_eligibility(node_id, True)
        log.info("warm-up: node %s holds %s: eligible", node_id, image)
    for node_id in result.failed:
        nomad.set_eligibility(node_id, False)
        log.warning("warm-up: node %s stays ineligible: %s", node_id, result.failed[node_id])
    return result


def _open_for_pull(
    nomad: Any, clock: Clock, namespace: str, nodes: set[str], dispatch: Callable[[], str]
) -> str:
    """Nomad places nothing (sysbatch included) on an ineligible node, so the nodes are
    eligible only from the dispatch until the prefetch allocation is placed on each of them
    (running allocations stay when a node turns ineligible); then they close again until
    their pull succeeded."""
    for node_id in nodes:
        nomad.set_eligibility(node_id, True)
    try:
        child = dispatch()
        for _ in range(30):  # the scheduler places within milliseconds
            placed = {a.node_id for a in nomad.job_allocations(child, namespace=namespace)}
            if nodes <= placed:
                break
            clock.sleep(1.0)
        return child
    finally:
        for node_id in nodes:
            nomad.set_eligibility(node_id, False)
