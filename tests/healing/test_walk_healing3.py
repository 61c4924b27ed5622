"""Scripted healing, third walk-through: a terminate notice that meets a live-migration run as
it ends, shutting the webhook dispatcher down, allocation prefixes, and on-call's CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from nomadscale.config.settings import Secret
from nomadscale.core.clock import Clock
from nomadscale.core.ports import KVEntry
from nomadscale.healing.webhooks import make_app, sign
from nomadscale.integrations.memkv import MemoryKV
from tests.healing.conftest import ROOT, WEBHOOK_SECRET, ZONES, Rig, serve
from tests.healing.test_e2e import incident_body, play_host_maintenance, post

MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
RUNBOOK = "gpu-host-maintenance"


class HookKV(MemoryKV):
    """The real in-memory KV with one-shot hooks on keys starting with a prefix:
    ``after_get[prefix]`` runs right after such a key is read, ``before_put[prefix]`` right
    before one is written. They put a second party exactly between two KV operations of the
    first, deterministically (no racing sleeps)."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self.after_get: dict[str, Callable[[], None]] = {}
        self.before_put: dict[str, Callable[[], None]] = {}

    @staticmethod
    def _take(hooks: dict[str, Callable[[], None]], key: str) -> Callable[[], None] | None:
        for prefix in list(hooks):
            if key.startswith(prefix):
                return hooks.pop(prefix, None)
        return None

    def get(self, key: str) -> KVEntry | None:
        e = super().get(key)
        hook = self._take(self.after_get, key)
        if hook is not None:
            hook()
        return e

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        hook = self._take(self.before_put, key)
        if hook is not None:
            hook()
        return super().put(key, value, cas=cas)


def _drive_until(rig: Rig, run_id: str, pred: Callable[[dict[str, Any]], bool]) -> dict:
    run = rig.engine.get_run(run_id)
    assert run is not None
    for _ in range(200):
        if pred(run):
            return run
        run = rig.engine.run(run_id, max_calls=1)
        assert run["status"] in ("pending", "running"), run
    raise AssertionError(f"run never got there: {run}")


# --- 1. a terminate notice that meets the live-migration run as it ends ------------------------


@pytest.mark.parametrize(
    "when", ["run-ends-before-the-notice-is-recorded", "notice-after-the-last-check",
             "node-serves-again"],
)  # fmt: skip
def test_terminate_notice_as_the_migration_run_ends_starts_a_new_run(
    rig_factory: Any, when: str
) -> None:
    # the watcher reported a live migration and that run is ending; the VM's notice turns
    # into a stop right then. The stop must be handled: the node is stopped within the hour,
    # and nobody drains it if the notice is swallowed by the ending run.
    rig = rig_factory(kv=HookKV())
    kv: HookKV = rig.kv  # type: ignore[assignment]
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    service = rig.make_engine()  # the process driving the run; rig.engine takes the notice
    first = rig.engine.submit(RUNBOOK, {"node": node.id, "event": MIGRATE},
                              trigger=f"maintenance:{MIGRATE}")  # fmt: skip
    steps = len(rig.engine.runbooks[RUNBOOK].steps)
    esc_key = f"nomadscale/runbooks/escalations/{first['id']}"
    notice: dict[str, Any] = {}

    def notify() -> None:
        notice.update(rig.engine.submit(RUNBOOK, {"node": node.id, "event": TERMINATE},
                                        trigger=f"maintenance:{TERMINATE}"))  # fmt: skip

    if when == "run-ends-before-the-notice-is-recorded":
        # the notice saw the run active; the run ends before the notice is written down
        _drive_until(rig, first["id"], lambda r: r["step"] == steps)
        kv.before_put[esc_key] = lambda: service.run(first["id"])
        notify()
    elif when == "notice-after-the-last-check":
        # the run looked for a passed-on event before its last call and found none; the
        # notice comes right after that look, while the run is still active
        _drive_until(rig, first["id"], lambda r: r["step"] == steps)
        kv.after_get[esc_key] = notify
        service.run(first["id"])
    else:
        # mark_eligible is done: the skipped wait for the restart cannot be gone back to
        _drive_until(rig, first["id"], lambda r: r["step"] == steps - 2)
        notify()
        service.run(first["id"])
    assert notice, "the notice was never submitted"
    ended = rig.engine.get_run(first["id"])
    assert ended is not None and ended["status"] == "succeeded" and ended["finalized"], ended
    new = [r for r in rig.engine.list_runs() if r["id"] != first["id"]]
    assert len(new) == 1, rig.engine.list_runs()
    (follow,) = new
    assert follow["status"] == "pending" and not follow["dry_run"], follow
    assert follow["values"]["event"] == TERMINATE and follow["values"]["node.id"] == node.id
    assert follow["trigger"] == f"maintenance:{TERMINATE}"
    assert kv.get(esc_key) is None  # nothing left behind for a run that is over
    lock = kv.get(f"nomadscale/runbooks/locks/zone/{ZONES[0]}")
    assert lock is not None and lock.value.decode() == follow["id"]
    if when != "run-ends-before-the-notice-is-recorded":
        assert ended.get("followup") == follow["id"], ended
    # and it heals the node for the stop: drained, seen down, back, GPUs checked
    rig.engine.start()
    rig.engine.resume_all()
    play_host_maintenance(rig, node.id, follow["id"])
    done = rig.wait_run(lambda r: r["id"] == follow["id"] and r["finalized"], timeout=30)
    assert done["status"] == "succeeded", done
    wait = next(r for r in done["results"] if r["action"] == "wait_node")
    assert wait["detail"].endswith("is ready"), wait


# --- 2. the webhook dispatcher stops with the service -------------------------------------------


def test_shutdown_while_a_webhook_is_handled_loses_nothing(rig_factory: Any) -> None:
    # `serve`/`run` stop the engine on SIGTERM while the dispatcher is submitting an incident's
    # run and another incident waits in its queue. Both must end up as runs in KV (the next
    # process resumes them); a webhook arriving meanwhile gets a 503 so that PagerDuty's
    # retry, to the next process, is handled and not dropped as a duplicate.
    kv = HookKV()
    rig = rig_factory(kv=kv)
    disp = rig.app.state.dispatcher
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:  # the dispatcher is in the middle of storing the first run
        busy.set()
        assert release.wait(10)

    kv.before_put["nomadscale/runbooks/runs/"] = hold
    nodes = [rig.twin.cluster.nodes[rig.node_id(z, i)]
             for z, i in ((ZONES[0], 0), (ZONES[1], 0), (ZONES[0], 1))]  # fmt: skip
    bodies = [incident_body(f"Nomad node down: {n.name}", f"Q5STOP{i:03d}")
              for i, n in enumerate(nodes)]  # fmt: skip
    assert post(rig, bodies[0], sign(WEBHOOK_SECRET, bodies[0]), "wh-stop-0") == 202
    assert busy.wait(10)
    assert post(rig, bodies[1], sign(WEBHOOK_SECRET, bodies[1]), "wh-stop-1") == 202
    stopper = threading.Thread(target=rig.engine.stop, kwargs={"timeout": 10})
    stopper.start()
    end = time.monotonic() + 10
    # until the stop is under way (or over: a dispatcher that is not stopped at all)
    while stopper.is_alive() and not getattr(disp, "stopping", False) and time.monotonic() < end:
        time.sleep(0.005)
    assert post(rig, bodies[2], sign(WEBHOOK_SECRET, bodies[2]), "wh-stop-2") == 503
    release.set()
    stopper.join(15)
    assert not stopper.is_alive() and not disp.running
    runs = {r["values"]["incident.id"]: r for r in rig.engine.list_runs()}
    assert sorted(runs) == ["Q5STOP000", "Q5STOP001"], runs
    assert all(r["status"] == "pending" for r in runs.values()), runs
    # the next process: resumes both, and PagerDuty's retry of the refused one is taken
    nxt = rig.make_engine()
    app = make_app(engine=nxt, secrets=[Secret(WEBHOOK_SECRET)], report_token=None)
    url, server, thread = serve(app)
    try:
        r = httpx.post(f"{url}/webhooks/pagerduty", content=bodies[2], headers={
            "Content-Type": "application/json", "X-Webhook-Id": "wh-stop-2",
            "X-PagerDuty-Signature": sign(WEBHOOK_SECRET, bodies[2])})  # fmt: skip
        assert r.status_code == 202, r.text
        assert sorted(nxt.resume_all()) == sorted(r["id"] for r in runs.values())
        third = rig.wait_run(lambda r: r["values"].get("incident.id") == "Q5STOP002")
        assert third["runbook"] == "node-down" and third["values"]["node.id"] == nodes[2].id
        # (handled: here refused while the other node of its zone is being healed)
        assert third["status"] == "refused" and "being healed" in third["error"], third
    finally:
        nxt.stop(timeout=2)
        server.should_exit = True
        thread.join(5)


# --- 3. an allocation prefix is one lookup in Nomad ----------------------------------------------


def _requests(rig: Rig) -> list[str]:
    """Every request the twin answers from now on, as "METHOD /path" (a 0 s latency rule)."""
    rig.twin.cluster.faults.latency(r"^GET /v1/", 0.0)
    return rig.twin.cluster.faults.hits


def _live_allocs(rig: Rig) -> list[Any]:
    allocs = rig.nomad.job_allocations("ml-worker", namespace="ekyc")
    return sorted((a for a in allocs if not a.terminal), key=lambda a: a.create_index)


def test_allocation_prefix_is_one_lookup_not_one_per_node(rig_factory: Any) -> None:
    # `nomad alloc status` shows 8 characters; resolving them must not cost one request per
    # node (2,000 of them on a big cluster) for every stuck-allocation run
    rig = rig_factory()
    alloc = _live_allocs(rig)[0]
    hits = _requests(rig)
    run = rig.engine.submit("stuck-allocation", {"allocation": alloc.id[:8]})
    assert run["values"]["allocation.id"] == alloc.id and run["status"] == "pending"
    reads = [h.removeprefix("latency ") for h in hits]
    assert not [r for r in reads if r.startswith("GET /v1/node")], reads
    assert [r for r in reads if r.startswith("GET /v1/allocations")] == ["GET /v1/allocations"]


def test_ambiguous_allocation_prefix_names_the_matches(rig_factory: Any, tmp_path: Any) -> None:
    rig = rig_factory()
    one, two = _live_allocs(rig)[:2]
    twin = rig.twin.cluster
    with twin.lock:  # two allocations whose ids share their first 8 characters
        moved = twin.allocs.pop(two.id)
        moved.id = one.id[:8] + two.id[8:]
        twin.allocs[moved.id] = moved
    r = runbook_cli(rig, tmp_path, "run", "stuck-allocation", "--param",
                    f"allocation={one.id[:8]}")  # fmt: skip
    assert r.exit_code == 1, r.output
    want = (f"error: allocation '{one.id[:8]}' is ambiguous: 2 allocations start with it "
            f"({', '.join(sorted([one.id, moved.id]))}); give the full id\n")  # fmt: skip
    assert r.stderr == want and r.stdout == ""
    r = runbook_cli(rig, tmp_path, "run", "stuck-allocation", "--param", "allocation=0badf00d")
    assert (r.exit_code, r.stderr) == (1, "error: allocation '0badf00d' not found in Nomad\n")


def runbook_cli(rig: Rig, tmp_path: Any, *args: str) -> Any:
    """``nomadscale runbook ...`` as on-call runs it: NOMAD_ADDR, the shipped runbooks and
    policies, no Consul (in-memory KV), an empty config file."""
    from click.testing import CliRunner

    from nomadscale.cli.main import _register, cli

    _register()
    config = tmp_path / "nomadscale.yaml"
    config.write_text("{}\n")
    env = {
        "NOMADSCALE_CONFIG": str(config),
        "NOMAD_ADDR": rig.twin.address,
        "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"),
        "NOMADSCALE_POLICIES": str(ROOT / "policies"),
        "CONSUL_HTTP_ADDR": None,
        "NOMAD_TOKEN": None,
        "NOMAD_NAMESPACE": None,
        "NOMADSCALE_PD_API_KEY": None,
    }
    return CliRunner().invoke(cli, ["runbook", *args], env=env)


# --- 4. on-call's command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "says"),
    [
        (["node=gpu-a", "node=gpu-b"], "error: --param node: given more than once\n"),
        (["node=gpu zone a"], "error: runbook gpu-host-maintenance: parameter node: invalid value "
         "'gpu zone a' (expected a Nomad node id, id prefix or name (letters, digits, '.', '_', "
         "'-'; up to 64))\n"),
        (["node=gpu-a", "event=TERMINATE"], "error: runbook gpu-host-maintenance: parameter "
         "event: invalid value 'TERMINATE' (expected TERMINATE_ON_HOST_MAINTENANCE or "
         "MIGRATE_ON_HOST_MAINTENANCE)\n"),
    ],
    ids=["repeated", "bad-node", "bad-event"],
)  # fmt: skip
def test_runbook_run_parameter_mistakes_are_one_line(
    rig_factory: Any, tmp_path: Any, params: list[str], says: str
) -> None:
    rig = rig_factory()
    args = [x for p in params for x in ("--param", p)]
    r = runbook_cli(rig, tmp_path, "run", RUNBOOK, *args, "--dry-run")
    assert (r.exit_code, r.stderr, r.stdout) == (2, says, "")


def test_dry_run_counts_the_surge_it_would_add_before_the_drain(
    rig_factory: Any, tmp_path: Any
) -> None:
    # a zone down to one worker: the real run surges a second one, waits for it to serve,
    # then drains. The dry run must say that it would work, not refuse the drain for the
    # surge it only pretended to add.
    rig = rig_factory()
    rig.nomad.scale("ml-worker", "ml-worker-a", 1, message="test", namespace="ekyc")
    rig.twin.advance(300)
    (last,) = [a for a in _live_allocs(rig) if a.task_group == "ml-worker-a"]
    r = runbook_cli(rig, tmp_path, "run", RUNBOOK, "--param", f"node={last.node_id}",
                    "--param", f"event={MIGRATE}", "--dry-run")  # fmt: skip
    assert r.exit_code == 0, r.output
    drain = next(x for x in r.stdout.splitlines() if "] drain:" in x)
    assert "ok: would drain" in drain, r.stdout
    assert r.stdout.splitlines()[-1].endswith(": succeeded"), r.stdout
    # and so it goes for real
    run = rig.engine.submit(RUNBOOK, {"node": last.node_id, "event": MIGRATE})
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded", done


# --- 5. one incident delivered twice at once ----------------------------------------------------


def test_same_node_submitted_by_two_processes_at_once_is_one_run(rig_factory: Any) -> None:
    # two replicas behind the webhook URL each take a delivery of the same incident (two
    # webhook subscriptions): the second must be the first's duplicate, not a refused run
    # that tells the incident "another node in the zone is being healed"
    kv = HookKV()
    rig = rig_factory(kv=kv)
    other = rig.make_engine()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    params = {"node": node.id, "incident_id": "Q6TWICE01"}
    theirs: dict[str, Any] = {}
    # the other replica stores its run right between this one's look for an active run and
    # its zone lock
    kv.before_put["nomadscale/runbooks/locks/zone/"] = lambda: theirs.update(
        other.submit("node-down", params, trigger="pagerduty:EV1")
    )
    ours = rig.engine.submit("node-down", params, trigger="pagerduty:EV1")
    assert theirs["status"] == "pending"
    assert ours.get("duplicate") and ours["id"] == theirs["id"], ours
    assert [r["id"] for r in rig.engine.list_runs()] == [theirs["id"]]


def test_incident_delivered_twice_gets_no_note_saying_it_gets_no_notes(rig_factory: Any) -> None:
    # the second delivery (another subscription: another webhook id, the same incident) finds
    # the incident's own run: no note may tell that incident it "gets no further notes"
    rig = rig_factory()
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    rig.pd.open_incident("Q6TWICE02")
    body = incident_body(f"Nomad node down: {node.name}", "Q6TWICE02")
    assert post(rig, body, sign(WEBHOOK_SECRET, body), "wh-sub-1") == 202
    assert post(rig, body, sign(WEBHOOK_SECRET, body), "wh-sub-2") == 202
    run = rig.wait_run(lambda r: r["runbook"] == "node-down")
    assert rig.pd.wait_for(lambda s: bool(s.notes.get("Q6TWICE02")), timeout=10)
    assert rig.app.state.dispatcher.wait_idle(10)
    notes = [n["content"] for n in rig.pd.state.notes["Q6TWICE02"]]
    assert not [n for n in notes if "no further notes" in n], notes
    assert notes[0].startswith(f"nomadscale node-down run {run['id']}"), notes
    assert [r["id"] for r in rig.engine.list_runs()] == [run["id"]]


def test_runbook_run_prints_each_step_as_it_happens(rig_factory: Any, tmp_path: Any) -> None:
    # a node-down run waits (here: for its surge worker, which the twin does not start while
    # its virtual time stands still); on-call must see the steps already done, not a silent
    # terminal for up to an hour
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    config = tmp_path / "nomadscale.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL_"))} | {
        "NOMADSCALE_CONFIG": str(config),
        "NOMAD_ADDR": rig.twin.address,
        "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"),
        "NOMADSCALE_POLICIES": str(ROOT / "policies"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomadscale", "runbook", "run", "node-down", "--param",
         f"node={node.name}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)  # fmt: skip
    reader.start()
    try:
        end = time.monotonic() + 30
        while not any(x.startswith("[main 2] surge: ok") for x in lines):
            assert time.monotonic() < end and proc.poll() is None, (lines, proc.poll())
            time.sleep(0.05)
        assert proc.poll() is None  # still waiting for the surge: the run is not over
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert lines[0].startswith("[main 0] notify: ok: logged: nomadscale node-down run"), lines
    assert lines[1].startswith(f"[main 1] mark_ineligible: ok: node {node.name}"), lines


# --- 6. healing while the autoscaler's cycle scales the same group ----------------------------


def test_autoscaler_count_after_the_surge_is_not_cut_by_the_release(rig_factory: Any) -> None:
    # the run surged ml-worker-a 2 -> 3; while the node was away the autoscaler's cycle set
    # the group to its own decision (3 -> 2: counts are absolute). Releasing "the surge" now
    # would take the zone to 1 worker, below the autoscaler's decision, for a whole cycle.
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    run = rig.engine.submit(RUNBOOK, {"node": node.id, "event": MIGRATE})
    steps = rig.engine.runbooks[RUNBOOK].steps
    release = next(i for i, s in enumerate(steps) if s.action == "release_surge")
    _drive_until(rig, run["id"], lambda r: r["step"] == release)
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 3
    rig.nomad.scale("ml-worker", "ml-worker-a", 2, message="nomadscale: predictive",
                    meta={"decision_id": "d-1"}, namespace="ekyc")  # fmt: skip
    rig.twin.advance(120)
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded", done
    (rel,) = [r for r in done["results"] if r["action"] == "release_surge"]
    assert rel["detail"].startswith("no surge to release"), rel
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2


def test_surge_is_released_when_nobody_scaled_since(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    run = rig.engine.submit(RUNBOOK, {"node": node.id, "event": MIGRATE})
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded", done
    (rel,) = [r for r in done["results"] if r["action"] == "release_surge"]
    assert rel["detail"] == "released surge: ml-worker/ml-worker-b -> 2", rel
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-b"].desired == 2
