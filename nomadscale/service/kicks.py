"""Retrying an operator's "apply now" that met a Nomad deployment or a deploy rollout.

Every Scale API count change is a new job version: Nomad updates the workers it keeps in place
into a new deployment and watches their health again for about min_healthy_time, refusing the
Scale API meanwhile, and a cycle skips while a deployment runs. A kick (``nomadscale scale
--now``, ``override set --now``) arriving in that window would be used up by a skipped cycle
and the override would wait for the next scheduled cycle, up to a cycle later. Instead the
leader tries the kick again every ``every_s`` until it applies, another kick replaces it, or
``give_up_s`` passed (a long rollout by someone else: the scheduled cycles take over).

The same holds for a golden-image rollout (``nomadscale deploy``): cycles skip with
``deploy-rollout`` while its record is active. A rollout lasts longer than a deployment (one
node at a time), so its kick is tried less often (``rollout_every_s``) for longer
(``rollout_give_up_s``); each try is a skipped cycle in the decision history, and both bounds
keep that to about 60 records. When the kick gives up, the log says that the first scheduled
cycle after the rollout applies it.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

from nomadscale.core.clock import Clock
from nomadscale.service.cycle import CycleResult

log = logging.getLogger(__name__)

RETRY_EVERY_S = 15.0
GIVE_UP_S = 900.0
ROLLOUT_RETRY_EVERY_S = 60.0
ROLLOUT_GIVE_UP_S = 3600.0
RETRIED = ("deployment", "deploy-rollout")  # the cycle skips a kick is tried again after


@dataclass
class _Waiting:
    kick: str
    first: float  # clock.monotonic() of the first skipped try
    due: float  # next try; inf while one is under way


class KickRetries:
    def __init__(
        self,
        *,
        clock: Clock,
        every_s: float = RETRY_EVERY_S,
        give_up_s: float = GIVE_UP_S,
        rollout_every_s: float = ROLLOUT_RETRY_EVERY_S,
        rollout_give_up_s: float = ROLLOUT_GIVE_UP_S,
    ) -> None:
        self.clock = clock
        self.every_s = every_s
        self.give_up_s = give_up_s
        self.rollout_every_s = rollout_every_s
        self.rollout_give_up_s = rollout_give_up_s
        self._waiting: dict[str, _Waiting] = {}
        self._mu = threading.Lock()

    def outcome(self, policy: str, kick: str, result: CycleResult | None) -> None:
        """Record how the kicked cycle ended: a skip for a Nomad deployment or a deploy
        rollout waits and retries (bounded)."""
        now = self.clock.monotonic()
        rec = result.record if result is not None else None
        with self._mu:
            prev = self._waiting.pop(policy, None)
            if rec is None or rec.skipped not in RETRIED:
                return
            rollout = rec.skipped == "deploy-rollout"
            every = self.rollout_every_s if rollout else self.every_s
            give_up = self.rollout_give_up_s if rollout else self.give_up_s
            first = prev.first if prev is not None and prev.kick == kick else now
            if now - first >= give_up:
                after = "the rollout ends" if rollout else "the deployment ends"
                log.warning("%s: apply-now %s given up: %s for %.0fs; the first scheduled cycle "
                            "after %s applies it", policy, kick, rec.reason, now - first,
                            after)  # fmt: skip
                return
            self._waiting[policy] = _Waiting(kick=kick, first=first, due=now + every)
        log.info("%s: apply-now %s waits: %s (trying again in %.0fs)",
                 policy, kick, rec.reason, every)  # fmt: skip

    def due(self, current: dict[str, str | None]) -> list[tuple[str, str]]:
        """Kicks to try again now (``current``: the latest kick id per policy; an older kick
        is dropped); each is marked under way until its ``outcome``."""
        now = self.clock.monotonic()
        out = []
        with self._mu:
            for policy, w in list(self._waiting.items()):
                if current.get(policy) != w.kick:
                    del self._waiting[policy]
                elif w.due <= now:
                    w.due = math.inf
                    out.append((policy, w.kick))
        return out

    def waiting(self, policy: str) -> str | None:
        with self._mu:
            w = self._waiting.get(policy)
            return w.kick if w is not None else None
