"""Nodes that joined a zone since the rollout's prefetch (recreated instances, nodes eligible
again): the rollout pulls the image on them before it places anything there.

The invariant: no allocation of the new version lands on a node without the image (a ~7 GB
pull there, and a worker counted as capacity while it still pulls). The rollout places
allocations at a few moments only, and tops the zone up right before each: a zone's job
version (after its start's re-plan, which may hold while nodes join), every node step inside
the zone's deployment (the rollout pauses the deployment while a replacement is in flight and
resumes it for the next one; see ``steps``), a canary's promotion, a surge worker, and the
resumption of a deployment held for a surge worker. A node whose pull fails is made
ineligible: nothing of the rollout is placed on it.
"""

from __future__ import annotations

import logging
from functools import partial

from nomadscale.deploy.base import RolloutBase
from nomadscale.deploy.prefetch import has_image, prefetch
from nomadscale.deploy.replan import zone_nodes

log = logging.getLogger(__name__)


class NodeTopUp(RolloutBase):
    def _top_up_in_zone(self, group: str) -> None:
        """``_top_up`` while the zone's deployment waits for it: one bounded pull (half the
        progress deadline, no retry); a node that has not got the image by then is made
        ineligible."""
        self._top_up(group, timeout_s=self.d.progress_deadline.total_seconds() / 2, retries=0)

    def _top_up(self, group: str, *, timeout_s: float = 1800.0, retries: int | None = None) -> None:
        """Prefetch the image on the nodes of ``group``'s zone that the rollout's prefetch did
        not cover (joined, or eligible again, since): a surge worker or a replacement placed
        there would pull the ~7 GB image first. A node whose pull fails is made ineligible
        whatever ``on_prefetch_failure`` says: the rollout is under way, and it places nothing
        on a node without the image."""
        st = self._st()
        if not st.prefetch.get("wanted"):
            return  # the operator rolls out without prefetch
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        nodes = self._call(lambda: zone_nodes(self.policy, self.nomad, spec=job.spec,
                                              group=group))  # fmt: skip
        ok = set(st.prefetch.get("ok") or [])
        fresh = [
            n for n in nodes
            if n.id not in ok and not self._call(partial(has_image, self.nomad, n.id, st.image))
        ]  # fmt: skip
        ok |= {n.id for n in nodes} - {n.id for n in fresh}  # holding it already (warm-up)
        st.prefetch["ok"] = sorted(ok)
        if not fresh:
            return
        names = {n.id: n.name for n in fresh}
        log.info("deploy %s: zone %s: %s node(s) joined since the prefetch: pulling %s on %s",
                 st.policy, group, len(fresh), st.image,
                 ", ".join(sorted(names.values())))  # fmt: skip
        res = self._call(lambda: prefetch(
            self.nomad, image=st.image, nodes=fresh, job_id=self.prefetch_job, namespace=self.ns,
            clock=self.clock, timeout_s=timeout_s, poll_s=self.poll_s,
            retries=self.d.prefetch_retries if retries is None else retries,
        ))  # fmt: skip
        st.prefetch["ok"] = sorted(ok | set(res.ok))
        note = (f"zone {group}: prefetched {st.image} on {len(res.ok)}/{len(fresh)} node(s) "
                "that joined since")  # fmt: skip
        if res.ok:
            note += ": " + ", ".join(sorted(names[i] for i in res.ok))
        if res.failed:
            for node_id in res.failed:
                self._call(partial(self.nomad.set_eligibility, node_id, False))
            st.prefetch["failed"] = {**(st.prefetch.get("failed") or {}), **res.failed}
            ineligible = set(st.prefetch.get("ineligible") or []) | set(res.failed)
            st.prefetch["ineligible"] = sorted(ineligible)
            bad = ", ".join(f"{names[i]} ({r})" for i, r in sorted(res.failed.items()))
            note += f"; failed on {bad}: made ineligible"
        self._save(note)
