"""How a rollout ends: the rollback (``_rollback``), the job's own update blocks given back
(``_restore_update_blocks``) and a zone that Nomad rolled back by itself while no nomadscale
followed it (``_reverted_zone``).

The rollout registers its own update block on the zone group it rolls (max_parallel 1,
manual promotion, ``deploy.canary`` canaries in the first zone) and no canary on the others.
Whatever the end (completed, rolled back, aborted), the job's groups get back the update
blocks they had before the rollout, recorded at its start: a change made through Nomad
afterwards (``nomad job run``) canaries the way the job file says. That registration changes
only update blocks, which Nomad applies to the running allocations in place (tasksUpdated
does not compare them): nothing is replaced. It still starts a short deployment (Nomad
watches the updated allocations' health again for min_healthy_time), and the rollout ends
only once that deployment did: the autoscaler's next cycle, ``scale --now`` and the next
``deploy start`` find the job quiet.
"""

from __future__ import annotations

import logging
from functools import partial

from nomadscale.core.errors import ConflictError
from nomadscale.core.ports import DeploymentInfo
from nomadscale.deploy import spec as jobspec
from nomadscale.deploy.blocked import BlockedWatch
from nomadscale.deploy.preflight import task_images

log = logging.getLogger(__name__)


class Ending(BlockedWatch):
    def _rollback(self, reason: str, *, status: str, failed: bool = False) -> None:
        """Fail the running deployment (auto-revert), roll finished zones back, release the
        surge, give the update blocks back and finish with ``status``."""
        st = self._st()
        st.status, st.ending = "rolling-back", {"status": status, "reason": reason}
        self._save(f"rolling back: {reason}")
        dep = self._rollout_deployment()
        if dep is not None:
            if dep.status == "running":
                self._call(partial(self.nomad.pause_deployment, dep.id, pause=True))
            if dep.active:
                self._call(lambda: self.nomad.fail_deployment(dep.id))
        self._no_canary_back()
        self._settle()
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        prev = st.previous_image
        if prev and any(i != prev for g in st.zones for i in task_images(dict(job.spec), g)):
            # every zone group back on it, whatever the record missed
            spec = jobspec.with_image(
                dict(job.spec), image=prev, groups=st.zones, update=None, update_group=None
            )
            if spec != dict(job.spec):
                self._call(lambda: self.nomad.register_job(spec, namespace=self.ns))
                self._settle()
        if prev and self.store.golden_image(self.policy.name) == st.image != prev:
            # the prefetch made the new image golden: node warm-ups and image prunes keep the
            # golden image, and the fleet runs the previous one again
            self.store.set_golden_image(self.policy.name, prev)
        st.deployment_id = None
        st.replan.pop("paused", None)
        self._release_surge()
        self._restore_update_blocks()
        if failed:
            self._alert(f"rollout of {st.image} rolled back: {reason}", "error")
        self._finish(status, reason)

    def _no_canary_back(self) -> None:
        """A rollback never waits for a canary. Nomad's auto-revert registers the last stable
        job version again with its own update blocks: when it is the version the rollout
        started from (the job file's ``canary``) and an allocation of a zone group still runs
        another image (a promoted canary, a replaced node), Nomad's reconciler wants a canary
        for that destructive update and the rollback deployment waits for a promotion that
        never comes (hashicorp/nomad#10882). Register the previous image again with Canary 0
        instead: it supersedes that deployment (Nomad stops its unpromoted canary), replaces
        the rest one at a time and stops the extra allocation; the job's own update blocks
        come back at the end (``_restore_update_blocks``)."""
        st = self._st()
        prev = st.previous_image
        if not prev:
            return
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        spec = dict(job.spec)
        if any(i != prev for g in st.zones for i in task_images(spec, g)):
            return  # not reverted to the previous image: registered below, without canaries
        canarying = [g for g in st.zones if jobspec.canaries(spec, g) > 0]
        waiting = self._running_other_image(canarying, prev) if canarying else []
        if not waiting:
            return
        back = jobspec.with_image(spec, image=prev, groups=st.zones, update=None,
                                  update_group=None)  # fmt: skip
        self._call(lambda: self.nomad.register_job(back, namespace=self.ns))
        what = ", ".join(waiting)
        st.note(self.clock.now(), f"{prev} registered again without canaries: job version "
                f"{job.version} wanted a canary to replace the new image in {what}")  # fmt: skip
        log.info("deploy %s: rollback registered without canaries (%s)", st.policy, what)

    def _running_other_image(self, groups: list[str], image: str) -> list[str]:
        """Those of ``groups`` with a live allocation of a job version whose group runs
        another image than ``image`` (or of a version Nomad no longer keeps)."""
        allocs = self._call(lambda: self.nomad.job_allocations(self.job_id, namespace=self.ns))
        live = [a for a in allocs if a.task_group in groups and not a.terminal]
        if not live:
            return []
        versions = self._call(lambda: self.nomad.job_versions(self.job_id, namespace=self.ns))
        specs = {v.version: dict(v.spec) for v in versions}
        out: set[str] = set()
        for a in live:
            spec = specs.get(a.job_version)
            images = task_images(spec, a.task_group) if spec is not None else []
            if not images or any(i != image for i in images):
                out.add(a.task_group)
        return [g for g in groups if g in out]

    def _rollout_deployment(self) -> DeploymentInfo | None:
        """The rollout's deployment: the recorded one, else an active deployment of a job
        version newer than the rollout's start (registered, never recorded: the process
        stopped in between)."""
        st = self._st()
        if st.deployment_id:
            return self._call(lambda: self.nomad.deployment(st.deployment_id))
        if st.previous_version is None:
            return None
        dep = self._call(lambda: self.nomad.latest_deployment(self.job_id, namespace=self.ns))
        if dep is not None and dep.active and dep.job_version > st.previous_version:
            return dep
        return None

    def _restore_update_blocks(self) -> None:
        """Give the job's groups back the update blocks they had before the rollout (recorded
        at its start; for a record without them, the job version the rollout started from).
        Waits for a deployment still active (a released surge's) first, so the new version
        supersedes nothing; the registration replaces no allocation, but it starts a
        deployment that the rollout waits for (``_await_blocks_deployment``)."""
        st = self._st()
        blocks = st.update_blocks or self._update_blocks_at_start()
        if not blocks:
            return
        self._settle()
        for _ in range(3):
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            spec = jobspec.with_update_blocks(dict(job.spec), blocks)
            if spec == dict(job.spec):  # given back already (a resumed rollout)
                latest = self._call(lambda: self.nomad.latest_deployment(self.job_id,
                                                                         namespace=self.ns))  # fmt: skip
                if latest is not None and latest.active:
                    self._await_blocks_deployment(latest, blocks)
                return
            try:
                eval_id = self._call(partial(self.nomad.register_job, spec, namespace=self.ns,
                                             enforce_index=job.job_modify_index))  # fmt: skip
            except ConflictError as e:  # the job changed between the read and the write
                log.info("deploy %s: giving update blocks back: %s; again", st.policy, e)
                continue
            st.note(self.clock.now(), "the job's own update blocks given back")
            dep = self._blocks_deployment(str(eval_id or ""), job.version + 1)
            if dep is not None:
                self._await_blocks_deployment(dep, blocks)
            return
        log.warning("deploy %s: the job kept changing: update blocks not given back", st.policy)

    def _blocks_deployment(self, eval_id: str, version: int) -> DeploymentInfo | None:
        """The deployment the registration of the update blocks started (None: none). Real
        Nomad starts one: the allocations are updated in place, and an in-place update counts
        as a spec update (hashicorp/nomad scheduler/reconcile.go, ``createDeployment``:
        ``updatingSpec := len(destructive) != 0 || len(a.result.inplaceUpdate) != 0``); the
        clients then watch their health again for min_healthy_time (client/allocrunner/
        health_hook.go ``Update``: the deployment ID changed). Only a group whose block is
        empty (``strategy.IsEmpty()``) gets none. Known once the registration's evaluation
        is no longer pending (the scheduler commits a deployment with its plan)."""
        for _ in range(60):
            evals = self._call(lambda: self.nomad.job_evaluations(self.job_id, namespace=self.ns))
            done = not eval_id or any(e.id == eval_id and e.status != "pending" for e in evals)
            dep = self._call(lambda: self.nomad.latest_deployment(self.job_id, namespace=self.ns))
            if dep is not None and dep.job_version >= version:
                return dep
            if done:
                return None
            self.clock.sleep(1.0)
        self._pause("giving the job's own update blocks back: its evaluation still pending "
                    "after 60 s")  # fmt: skip
        return None

    def _await_blocks_deployment(self, dep: DeploymentInfo, blocks: dict[str, object]) -> None:
        """Wait (on the rollout's clock) until ``dep``, the deployment that gives the job its
        own update blocks back, ends: a rollout that ends meanwhile would leave it to the
        autoscaler's next cycle (skipped while a deployment runs) and to an operator's
        ``scale --now`` or next ``deploy start``. Bounded by the longest progress deadline of
        those blocks (Nomad fails the deployment by then); a deployment that fails, is
        cancelled or outlasts the bound pauses the rollout with why (``deploy resume`` gives
        the blocks back again and waits, ``deploy abort`` rolls back)."""
        st = self._st()
        limit = self._blocks_deadline_s(blocks) + max(60.0, 2 * self.poll_s)
        what = f"deployment {dep.id[:8]} of the job's own update blocks"
        self._save(f"waiting for {what} (Nomad watches the workers' health again)")
        t0 = self.clock.now()
        dep_id = dep.id
        while dep.active:
            waited = (self.clock.now() - t0).total_seconds()
            if waited > limit:
                self._pause(f"{what} still {dep.status} after {waited:.0f}s; 'deploy resume' "
                            "waits again")  # fmt: skip
            self._report({"phase": st.status, "deployment": dep.status, "note": what})
            self.clock.sleep(self.poll_s)
            dep = self._call(lambda: self.nomad.deployment(dep_id))
        if dep.status != "successful":
            self._pause(f"{what} {dep.status}: {dep.status_description or 'no reason given'}; "
                        "'deploy resume' gives the blocks back again")  # fmt: skip
        st.note(self.clock.now(), f"{what} successful")

    def _blocks_deadline_s(self, blocks: dict[str, object]) -> float:
        """The longest progress deadline among ``blocks`` (Nomad's Update JSON, nanoseconds),
        at least the rollout's own."""
        out = self.d.progress_deadline.total_seconds()
        for b in blocks.values():
            if isinstance(b, dict) and isinstance(b.get("ProgressDeadline"), int | float):
                out = max(out, float(b["ProgressDeadline"]) / jobspec.NS)
        return out

    def _update_blocks_at_start(self) -> dict[str, object]:
        st = self._st()
        if st.previous_version is None:
            return {}
        versions = self._call(lambda: self.nomad.job_versions(self.job_id, namespace=self.ns))
        for v in versions:
            if v.version == st.previous_version:
                return jobspec.update_blocks(dict(v.spec))
        return {}

    def _reverted_zone(self, group: str) -> str | None:
        """Why ``group`` (or a zone already done) no longer runs the rollout's image although
        the rollout registered it there: Nomad failed that deployment and auto-reverted the
        job (to its last stable version) while no nomadscale followed it (the process stopped
        between registering the zone and recording its deployment, or paused before it got
        one). None when nothing of the rollout was taken back."""
        st = self._st()
        if st.previous_version is None:
            return None
        versions = self._call(lambda: self.nomad.job_versions(self.job_id, namespace=self.ns))
        if not versions:
            return None
        current = versions[0]
        for g in [*st.zones_done, group]:
            images = task_images(dict(current.spec), g)
            if images and all(i == st.image for i in images):
                continue
            ours = [
                v.version for v in versions
                if v.version > st.previous_version
                and (imgs := task_images(dict(v.spec), g)) and all(i == st.image for i in imgs)
            ]  # fmt: skip
            if ours:
                return (
                    f"zone {g}: job version {max(ours)} ran {st.image}, version "
                    f"{current.version} runs {', '.join(sorted(set(images))) or 'nothing'} "
                    "(Nomad failed its deployment and reverted the job)"
                )
        return None
