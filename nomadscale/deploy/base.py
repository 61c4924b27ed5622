"""The plumbing a rollout shares across its parts: ports, the KV record (CAS), Nomad calls
retried through outages, alerts, progress reports, and stopping (paused or final)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nomadscale.config.policy import Policy
from nomadscale.core.clock import Clock
from nomadscale.core.errors import ConflictError, PermanentError, TemporaryError
from nomadscale.core.ports import AlertPort, DemandSource, DeploymentInfo, KVPort
from nomadscale.deploy.gate import SLIGate
from nomadscale.deploy.prefetch import DEFAULT_HCL
from nomadscale.deploy.replan import CURRENT_STEP_S
from nomadscale.deploy.state import RolloutState, StateStore

log = logging.getLogger(__name__)

Reporter = Callable[[RolloutState, dict[str, Any]], None]


def driver() -> str:
    """This process, as the record names the one driving the rollout (``deploy status``)."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class NothingToDo(Exception):
    """``start``: every zone group already runs the image; nothing was changed."""


class _Stop(Exception):
    """Internal: the rollout reached a final or paused state."""


class RolloutBase:
    def __init__(
        self,
        *,
        policy: Policy,
        nomad: Any,
        kv: KVPort,
        clock: Clock,
        prometheus: Any | None = None,
        demand: DemandSource | None = None,
        alerts: AlertPort | None = None,
        prefix: str = "nomadscale",
        reporter: Reporter | None = None,
        poll_s: float = 5.0,
        watch_wait_s: float = 30.0,
        outage_limit_s: float | None = None,
        prefetch_hcl: Any = DEFAULT_HCL,
        hold_limit_s: float | None = None,
        demand_step_s: float = CURRENT_STEP_S,
    ) -> None:
        if policy.deploy is None:
            raise PermanentError(f"policy {policy.name}: no 'deploy:' section")
        self.policy, self.d = policy, policy.deploy
        self.nomad, self.clock, self.alerts = nomad, clock, alerts
        self.demand = demand
        self.store = StateStore(kv, prefix=prefix)
        self.gate = SLIGate(sli=self.d.sli, prometheus=prometheus)
        self.reporter = reporter
        self.poll_s, self.watch_wait_s = poll_s, watch_wait_s
        self.outage_limit_s = outage_limit_s or self.d.progress_deadline.total_seconds()
        self.prefetch_hcl = prefetch_hcl
        # how long a hold (capacity short, no surge possible) lasts before the rollout pauses
        # and alerts: one autoscaler cycle, which the rollout holds meanwhile
        self.hold_limit_s = hold_limit_s or policy.cycle_s
        self.demand_step_s = demand_step_s
        self.gate_every_s = 30.0
        self.ns = policy.target.namespace
        self.job_id = policy.target.job
        self.prefetch_job = self.d.prefetch_job or "image-prefetch"
        self._index = 0
        self.state: RolloutState | None = None

    def _st(self) -> RolloutState:
        st = self.state
        assert st is not None
        return st

    def _wait_new_deployment(self, old_version: int) -> DeploymentInfo | None:
        for _ in range(60):
            dep = self._call(lambda: self.nomad.latest_deployment(self.job_id, namespace=self.ns))
            if dep is not None and dep.job_version > old_version:
                return dep
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            if job.version > old_version and dep is not None and dep.job_version < job.version:
                status = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
                if status.active_deployment is None:
                    return None
            self.clock.sleep(1.0)
        self._pause("the new job version got no deployment after 60 s")
        return None

    def _settle(self) -> None:
        """Wait until the job has no active deployment (auto-revert or rollback finished, or
        the short one every count change starts: Nomad refuses the Scale API meanwhile)."""
        limit = self.d.progress_deadline.total_seconds()
        t0 = self.clock.now()
        while (self.clock.now() - t0).total_seconds() < limit:
            s = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
            if s.active_deployment is None:
                return
            self.clock.sleep(self.poll_s)
        log.warning("deploy %s: a deployment is still active after %.0fs", self.policy.name, limit)

    def _pause(self, reason: str) -> None:
        st = self._st()
        st.status, st.reason = "paused", reason
        self._alert(f"rollout of {st.image} paused: {reason}", "warning")
        self._save(f"paused: {reason}")
        raise _Stop

    def _finish(self, status: str, reason: str) -> None:
        st = self._st()
        st.status, st.reason = status, reason
        st.finished_at = self.clock.now().isoformat()
        st.timings["total_s"] = self._elapsed()
        self._save(f"{status}: {reason}")
        log.info("deploy %s: rollout %s %s: %s", st.policy, st.id, status, reason)
        raise _Stop

    def _elapsed(self) -> float:
        st = self._st()
        return (self.clock.now() - datetime.fromisoformat(st.started_at)).total_seconds()

    def _save(self, note: str) -> None:
        st = self._st()
        st.note(self.clock.now(), note)
        log.info("deploy %s: %s", st.policy, note)
        self._persist()
        self._report({"phase": st.status, "note": note})

    def _persist(self) -> None:
        """Write the record (CAS) without a note: a flag or a heartbeat."""
        st = self._st()
        st.updated_at = self.clock.now().isoformat()
        try:
            self._index = self.store.save(st, self._index)
        except ConflictError:
            now = self.store.load(st.policy)[0]
            if now is None or now.id != st.id:
                raise
            raise ConflictError(
                f"deploy {st.policy}: rollout {st.id} was changed by another process (now "
                f"{now.status}: {now.reason}); this one stops",
                system="kv",
            ) from None

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Retry Nomad's temporary errors until the outage limit, then pause."""
        t0 = self.clock.now()
        while True:
            try:
                return fn()
            except TemporaryError as e:
                if (self.clock.now() - t0).total_seconds() > self.outage_limit_s:
                    if self.state is not None and self.state.status != "paused":
                        self._pause(f"nomad unavailable: {e}")
                    raise
                log.warning("deploy %s: %s; retrying", self.policy.name, e)
                self.clock.sleep(max(self.poll_s, e.retry_after))

    def _alert(self, summary: str, severity: str) -> None:
        if self.alerts is None:
            return
        st = self.state
        try:
            self.alerts.trigger(
                dedup_key=f"nomadscale-deploy-{self.policy.name}-{st.id if st else ''}",
                summary=f"nomadscale deploy {self.policy.name}: {summary}",
                severity=severity,
                details={"policy": self.policy.name, "image": st.image if st else "",
                         "rollout": st.id if st else "", "status": st.status if st else ""},
            )  # fmt: skip
        except (TemporaryError, PermanentError) as e:
            log.warning("deploy %s: alert not sent: %s", self.policy.name, e)

    def _report(self, info: dict[str, Any]) -> None:
        if self.reporter is not None and self.state is not None:
            self.reporter(self.state, info)
