"""Timed state changes: image pull and start, health, failure, completion, stops (the task's
kill time), reschedules, node boots, deployment progress deadlines and drain deadlines."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nomadscale.core.durations import parse_duration
from nomadscale.sim import deploy, drain, reschedule
from nomadscale.sim.model import NS, TERMINAL_CLIENT, Alloc, Node

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster

log = logging.getLogger(__name__)

FAIL_AFTER_START_S = 3.0
DEFAULT_PULL_TIMEOUT_S = 300.0  # docker driver image_pull_timeout default
DEFAULT_KILL_TIMEOUT_S = 5.0  # structs.DefaultKillTimeout


def _task_event(c: Cluster, a: Alloc, type_: str, msg: str = "") -> None:
    a.task_events.append({"Type": type_, "at": c.now_s(), "msg": msg})


def alloc_placed(c: Cluster, a: Alloc, node: Node) -> None:
    """The client received ``a``. A replacement waits for its previous allocation to be
    terminal on its client before anything else runs (client/allocwatcher NewAllocWatcher:
    a watcher for any PreviousAllocation, local or remote, whose Wait returns once it is
    Terminated(); client/allocrunner/alloc_runner_hooks.go initRunnerHooks runs that
    upstream allocs hook before the health watcher hook and the tasks): ``setup`` runs when
    that allocation exits (``_release_successor``)."""
    _task_event(c, a, "Received", "Task received by client")
    prev = c.allocs.get(a.previous_allocation) if a.previous_allocation else None
    if prev is not None and prev.client_status not in TERMINAL_CLIENT:
        c.awaiting_previous[prev.id] = a.id
        return
    setup(c, a, node)


def setup(c: Cluster, a: Alloc, node: Node) -> None:
    """Task setup, image pull and start, and the health watch's deadline, from now."""
    now = c.now_s()
    _task_event(c, a, "Task Setup", "Building Task Directory")
    pull_s = 0.0
    pull_fails = False
    if a.image and a.image not in node.images:
        pull_s = a.image_size_gb * 8000.0 / max(c.image_pull_mbps, 1e-6)
        _task_event(c, a, "Driver", f"Downloading image {a.image}")
        pull_fails = c.faults.take_pull_failure(node.id, a.image)
    timeout = _pull_timeout(a)
    if pull_fails:  # a broken layer download, halfway through the pull
        c.schedule(now + min(pull_s, timeout) / 2, "alloc_pull_failed", a.id, a.gen)
    elif pull_s > timeout:  # the docker driver gives up (image_pull_timeout, default 5m)
        c.schedule(now + timeout, "alloc_pull_timeout", a.id, a.gen)
    else:
        c.schedule(now + pull_s + c.start_s, "alloc_start", a.id, a.gen)
    watch = deploy.watch_times(a) if a.job.get("Type", "service") == "service" else None
    if watch is not None:
        c.schedule(now + watch[1], "alloc_deadline", a.id, a.gen)


def _pull_timeout(a: Alloc) -> float:
    for task in deploy.group_of(a).get("Tasks") or []:
        raw = (task.get("Config") or {}).get("image_pull_timeout")
        if raw:
            try:
                return parse_duration(str(raw)).total_seconds()
            except ValueError:
                break
    return DEFAULT_PULL_TIMEOUT_S


def terminate(
    c: Cluster,
    a: Alloc,
    *,
    desired: str | None,
    client_status: str,
    description: str,
    event: tuple[str, str] | None = None,
) -> None:
    """``a`` is terminal on its client (``desired``: the server's stop with it, as for a
    lost allocation). Blocked evaluations run again when a client reports an allocation
    complete or failed (nomad/fsm.go applyAllocClientUpdate -> blockedEvals.Unblock), not
    when the server stops one; a replacement waiting for ``a`` starts."""
    now = c.now_s()
    was_live = a.live
    if desired is not None:
        a.desired_status = desired
        a.desired_description = description
    a.client_status = client_status
    a.client_description = description
    if a.started_at is not None or client_status != "lost":
        a.finished_at = now
    a.gen += 1
    if event is None:
        kind = {"complete": "Killed", "failed": "Terminated", "lost": "Killing"}
        event = (kind.get(client_status, "Killed"), description)
    _task_event(c, a, *event)
    a.modify_time = now
    a.modify_index = c.bump("allocs")
    node = c.nodes.get(a.node_id)
    if was_live and not a.live and node is not None:
        node.track(a, -1)
    c.status_dirty.add((a.namespace, a.job_id))
    if client_status in ("complete", "failed"):
        c.capacity_changed()
    _drainer_wakes(c, a)
    c.emit(
        f"alloc_{'stopped' if client_status == 'complete' else client_status}",
        alloc_id=a.id,
        job_id=a.job_id,
        group=a.task_group,
        node_id=a.node_id,
        reason=description,
    )
    _release_successor(c, a)


def kill_time(c: Cluster, a: Alloc) -> tuple[float, float]:
    """(seconds from a stop to the client reporting the allocation complete, the first
    killed task's kill timeout). The group's shutdown_delay first (the group service hook's
    PreKill), then client/allocrunner/alloc_runner.go killTasks: the leader task alone (its
    shutdown_delay, then its kill timeout), then the other main tasks together, then the
    sidecars together; poststop tasks are not killed. A task's kill timeout is its
    kill_timeout capped by the client's max_kill_timeout (taskrunner/driver_handle.go
    NewDriverHandle: ``min(task.KillTimeout, maxKillTimeout)``). The twin's tasks take their
    whole kill timeout to exit."""
    tg = deploy.group_of(a)
    stages: list[list[float]] = [[], [], []]  # leader, main, sidecars
    first = 0.0
    for task in tg.get("Tasks") or []:
        life = task.get("Lifecycle") or {}
        if life.get("Hook") == "poststop":
            continue
        kill = min(
            _seconds(task.get("KillTimeout"), DEFAULT_KILL_TIMEOUT_S) or DEFAULT_KILL_TIMEOUT_S,
            c.max_kill_timeout_s,
        )
        stage = 0 if task.get("Leader") else 2 if life.get("Sidecar") else 1
        stages[stage].append(_seconds(task.get("ShutdownDelay"), 0.0) + kill)
        if not first or stage == 0:
            first = kill
    total = sum(max(s, default=0.0) for s in stages)
    first = first or min(DEFAULT_KILL_TIMEOUT_S, c.max_kill_timeout_s)
    return _seconds(tg.get("ShutdownDelay"), 0.0) + (total or first), first


def _seconds(v: object, default: float) -> float:
    return default if not isinstance(v, int | float) or isinstance(v, bool) else float(v) / NS


def go_duration(seconds: float) -> str:
    """Go's time.Duration String for whole and fractional seconds: 5s, 1m30s, 1h0m0s, 500ms."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms" if seconds > 0 else "0s"
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    text = f"{sec:g}s"
    if h:
        return f"{int(h)}h{int(m)}m{text}"
    return f"{int(m)}m{text}" if m else text


def stop(c: Cluster, a: Alloc, description: str) -> None:
    """The server stops ``a`` (DesiredStatus ``stop``). The scheduler counts its room free
    from now on (structs.Allocation.TerminalStatus includes a stop DesiredStatus;
    scheduler/context.go ProposedAllocs reads AllocsByNodeTerminal(false)), while its client
    kills the tasks: ClientStatus stays ``running`` until they exit (``kill_time``), then
    ``complete``. An allocation whose tasks have not started is done at once."""
    if not a.live:
        return
    now = c.now_s()
    a.desired_status = "stop"
    a.desired_description = description
    a.gen += 1  # no start, health or failure any more
    a.modify_time = now
    a.modify_index = c.bump("allocs")
    node = c.nodes.get(a.node_id)
    if node is not None:
        node.track(a, -1)
    c.status_dirty.add((a.namespace, a.job_id))  # terminal for the server from now on
    _drainer_wakes(c, a)
    c.emit(
        "alloc_stopping",
        alloc_id=a.id,
        job_id=a.job_id,
        group=a.task_group,
        node_id=a.node_id,
        reason=description,
    )
    if a.client_status != "running":
        _exit(c, a)
        return
    wait, kill = kill_time(c, a)
    _task_event(
        c, a, "Killing", f"Sent interrupt. Waiting {go_duration(kill)} before force killing"
    )
    c.schedule(now + wait, "alloc_exit", a.id, a.gen)


def _exit(c: Cluster, a: Alloc) -> None:
    terminate(
        c,
        a,
        desired=None,
        client_status="complete",
        description=a.desired_description,
        event=("Killed", "Task successfully killed"),
    )
    a.client_description = "All tasks have completed"
    _after_terminal(c, a)


def _release_successor(c: Cluster, a: Alloc) -> None:
    """``a`` is terminal on its client: the replacement waiting for it starts."""
    succ = c.allocs.get(c.awaiting_previous.pop(a.id, ""))
    if succ is None or not succ.live or succ.client_status != "pending":
        return
    node = c.nodes.get(succ.node_id)
    if node is not None and node.status == "ready":
        setup(c, succ, node)


def handle(c: Cluster, kind: str, key: str, gen: int) -> None:
    if kind == "deploy_deadline":
        deploy.deadline(c, key)
        return
    if kind == "drain_deadline":
        drain.force(c, key)
        return
    if kind == "node_boot":
        node = c.nodes.get(key)
        if node is not None and node.status == "initializing":
            c.set_node_status(node.id, "ready")
        return
    if kind == "reschedule":
        ns, job_id = key.split("\x00", 1)
        job = c.jobs.get((ns, job_id))
        if job is not None and not job.stopped:
            from nomadscale.sim import sched

            sched.reconcile(c, job, triggered_by="alloc-failure")
        return
    a = c.allocs.get(key)
    if a is None or a.gen != gen:
        return
    if kind == "alloc_start":
        _start(c, a)
    elif kind == "alloc_healthy":
        if a.client_status == "running" and a.healthy is None and _watched_for(c, a, 0):
            deploy.on_health(c, a, True)
            _drainer_wakes(c, a)  # it counts allocations whose health is set
    elif kind == "alloc_deadline":
        if a.healthy is None and a.desired_status == "run" and _watched_for(c, a, 1):
            deploy.on_health(c, a, False)
            _drainer_wakes(c, a)
    elif kind == "alloc_fail":
        if a.client_status == "running":
            _fail(c, a)
    elif kind == "alloc_pull_timeout":
        if a.client_status == "pending" and a.live:
            _task_event(
                c, a, "Driver Failure", f"Failed to pull `{a.image}`: context deadline exceeded"
            )
            _fail(c, a)
    elif kind == "alloc_pull_failed":
        if a.client_status == "pending" and a.live:
            _task_event(
                c,
                a,
                "Driver Failure",
                f"Failed to pull `{a.image}`: error pulling image layers: unexpected EOF",
            )
            _fail(c, a)
    elif kind == "alloc_exit":
        if a.desired_status != "run" and a.client_status == "running":
            _exit(c, a)
    elif kind == "alloc_complete" and a.client_status == "running":
        terminate(c, a, desired=None, client_status="complete", description="Exit Code: 0")
        _after_terminal(c, a)


def restart_health(c: Cluster, a: Alloc) -> None:
    """Clear ``a``'s health and watch it again from now: an in-place update moved it to
    another deployment. Nomad's scheduler sets its DeploymentStatus to nil (generic_sched.go
    computeJobAllocs, in-place updates) and the client's health hook clears the health when
    the DeploymentID changes (client/allocrunner/health_hook.go Update: "Deployment has
    changed, reset status" -> ClearHealth), then watches it as ``init`` does for a new
    allocation (``deploy.watch_times``): healthy min_healthy_time from now, or unhealthy at a
    new healthy_deadline; never, when the group has no update block (a deployment allocation
    of such a group is not watched), so its health stays unset."""
    now = c.now_s()
    a.healthy = None
    a.health_time = None
    a.health_index = 0
    a.health_since = now
    a.modify_index = c.bump("allocs")
    watch = deploy.watch_times(a)
    if watch is None:
        return
    min_healthy, healthy_deadline = watch
    c.schedule(now + healthy_deadline, "alloc_deadline", a.id, a.gen)
    if a.client_status == "running" and not (a.image and c.faults.image_is_bad(a.image)):
        c.schedule(now + min_healthy, "alloc_healthy", a.id, a.gen)


def _watched_for(c: Cluster, a: Alloc, which: int) -> bool:
    """Whether a health timer (``which``: 0 min_healthy_time, 1 healthy_deadline) is due for
    the current health watch: timers of a watch that ``restart_health`` replaced are early,
    and an allocation the client does not watch gets no health at all."""
    watch = deploy.watch_times(a)
    if watch is None:
        return False
    if a.health_since is None:
        return True
    return c.now_s() + 1e-6 >= a.health_since + watch[which]


def _start(c: Cluster, a: Alloc) -> None:
    node = c.nodes.get(a.node_id)
    if node is None or node.status != "ready" or not a.live:
        return
    now = c.now_s()
    if a.image:
        node.images.add(a.image)
    a.client_status = "running"
    a.started_at = now
    a.modify_time = now
    _task_event(c, a, "Started", "Task started by client")
    a.modify_index = c.bump("allocs")
    c.emit("alloc_running", alloc_id=a.id, job_id=a.job_id, group=a.task_group, node_id=a.node_id)
    jtype = a.job.get("Type", "service")
    watch = deploy.watch_times(a) if jtype == "service" else None
    if a.image and c.faults.image_is_bad(a.image):
        c.schedule(now + FAIL_AFTER_START_S, "alloc_fail", a.id, a.gen)
    elif watch is not None:
        c.schedule(now + watch[0], "alloc_healthy", a.id, a.gen)
    elif jtype in ("batch", "sysbatch"):
        c.schedule(now + c.batch_run_s, "alloc_complete", a.id, a.gen)


def _fail(c: Cluster, a: Alloc) -> None:
    """The allocation failed. A deployment's allocation is marked unhealthy (the client's
    clientAlloc does so for a failed allocation with a DeploymentID; the deployment watcher
    reacts in ``deploy.on_health``). Like Node.UpdateAlloc, an evaluation follows if its
    reschedule policy allows another attempt; the reconciler replaces it after the delay
    (reschedule.py)."""
    from nomadscale.sim import sched

    terminate(c, a, desired=None, client_status="failed", description="Exit Code: 1")
    if a.healthy is None and a.job.get("Type", "service") == "service":
        deploy.on_health(c, a, False)
    job = c.jobs.get((a.namespace, a.job_id))
    if (
        job is not None
        and not job.stopped
        and a.desired_status == "run"
        and reschedule.eligible(a, reschedule.policy(c, a), c.now_s())
    ):
        sched.reconcile(c, job, triggered_by="alloc-failure")
    _after_terminal(c, a)


def _after_terminal(c: Cluster, a: Alloc) -> None:
    """``a`` is done: its job's status may change (synced once the instant's changes are
    in, ``sched.sync_dirty``)."""
    c.status_dirty.add((a.namespace, a.job_id))


def _drainer_wakes(c: Cluster, a: Alloc) -> None:
    """An allocation of the job changed in a way the drainer reacts to (terminal, or its
    health set): look at the job again once this instant's changes are in."""
    if c.draining:
        c.drain_dirty.add((a.namespace, a.job_id))


def drain_pending(c: Cluster) -> None:
    """Run the node drainer for the jobs whose allocations changed (a health set, an
    allocation finished) since its last pass: Nomad's job watcher wakes on allocation
    changes (nomad/drainer/watch_jobs.go watch); the twin runs it once per instant."""
    jobs, c.drain_dirty = c.drain_dirty, set()
    drain.step(c, jobs=jobs)


def node_lost(c: Cluster, node: Node) -> None:
    from nomadscale.sim import sched

    jobs: dict[tuple[str, str], list[str]] = {}
    for a in list(c.allocs_by_node.get(node.id, ())):
        if a.live:
            terminate(
                c,
                a,
                desired="stop",
                client_status="lost",
                description="alloc is lost since its node is down",
            )
            jobs.setdefault((a.namespace, a.job_id), []).append(a.id)
        elif a.client_status in ("pending", "running"):
            # stopping: lost with its node (generic_sched.go updateNonTerminalAllocsToLost)
            terminate(
                c,
                a,
                desired=None,
                client_status="lost",
                description="alloc is lost since its node is down",
            )
    for key, lost in jobs.items():
        job = c.jobs.get(key)
        if job is not None:
            # the reconciler's lost set: replaced under their names whatever the
            # deployment's state (reconcile.go computePlacements, computeReplacements)
            sched.reconcile(c, job, triggered_by="node-update", node_id=node.id, lost=lost)


def node_ready(c: Cluster, node: Node) -> None:
    from nomadscale.sim import sched

    for job in list(c.jobs.values()):
        if job.type == "system" and not job.stopped:
            sched.reconcile(c, job, triggered_by="node-update", node_id=node.id)
