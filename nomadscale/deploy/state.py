"""The rollout record in KV, written with check-and-set.

``<prefix>/deploy/<policy>/state`` holds one JSON document. ``service.control.deploy_active``
reads ``active`` and ``status``: while ``active`` is true the autoscaler holds the policy.
``<prefix>/policies/<policy>/golden_image`` holds the policy's golden image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from nomadscale.core.errors import ConflictError, InputError
from nomadscale.core.ports import KVPort
from nomadscale.core.values import new_id

log = logging.getLogger(__name__)

# status values; the last four are terminal (``active`` false). ``held``: the re-plan before
# the next node step found too little capacity and no surge possible; the rollout waits.
RUNNING_PHASES = ("preflight", "prefetch", "canary", "rolling", "held", "rolling-back", "paused")
TERMINAL = ("completed", "rolled_back", "aborted", "refused")


_PHASE_TEXT = {
    "preflight": "in its preflight",
    "prefetch": "in its prefetch phase",
    "canary": "in its canary phase",
    "rolling": "rolling",
    "held": "held",
    "rolling-back": "rolling back",
    "paused": "paused",
}


def phase_text(status: str) -> str:
    """``status`` as the end of "rollout X of IMAGE is ...": "in its prefetch phase"."""
    return _PHASE_TEXT.get(status, status.replace("_", " "))


def deploy_key(prefix: str, policy: str) -> str:
    return f"{prefix.strip('/')}/deploy/{policy}/state"


def golden_key(prefix: str, policy: str) -> str:
    return f"{prefix.strip('/')}/policies/{policy}/golden_image"


@dataclass
class RolloutState:
    policy: str
    image: str
    job_id: str
    namespace: str
    status: str = "preflight"
    id: str = field(default_factory=new_id)
    previous_image: str | None = None
    previous_version: int | None = None
    deployment_id: str | None = None
    zones: list[str] = field(default_factory=list)  # task groups, in rollout order
    zones_done: list[str] = field(default_factory=list)
    current_zone: str | None = None
    surge: dict[str, Any] | None = None  # {"group", "from", "to", "released"}
    # what the preflight planned for: {"forecast_upper", "required_workers", "rpm_per_worker"}
    plan: dict[str, Any] = field(default_factory=dict)
    # the re-plan before node steps: {"paused": deployment id nomadscale paused between node
    # steps, "held_since": ISO time, "held_s"/"held_step": seconds of the step's earlier holds
    # and its zone, "canary": {"deployment", "index", "blocked"} while the canary is not
    # placed, "last": the last StepCheck.to_dict()}
    replan: dict[str, Any] = field(default_factory=dict)
    prefetch: dict[str, Any] = field(default_factory=dict)  # ok / failed / ineligible / ms
    # each task group's update block as the job had it before the rollout (group name ->
    # Update, None for none): the rollout registers its own and gives these back at the end
    update_blocks: dict[str, Any] = field(default_factory=dict)
    # a started rollback: {"status": the final status it ends with ("rolled_back",
    # "aborted"), "reason": why}; a process that resumes the record finishes the rollback
    # instead of rolling forward
    ending: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    updated_at: str = ""
    finished_at: str | None = None
    reason: str = ""
    owner: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    sli: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status not in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["active"] = self.active
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise InputError(f"deploy state record: {e}") from None

    def note(self, now: datetime, text: str) -> None:
        self.log.append(f"{now.isoformat(timespec='seconds')} {text}")
        del self.log[:-60]


class StateStore:
    """CAS reads and writes of one policy's rollout record."""

    def __init__(self, kv: KVPort, *, prefix: str = "nomadscale") -> None:
        self.kv = kv
        self.prefix = prefix.strip("/")

    def load(self, policy: str) -> tuple[RolloutState | None, int]:
        entry = self.kv.get(deploy_key(self.prefix, policy))
        if entry is None or not entry.value:
            return None, 0 if entry is None else entry.modify_index
        try:
            doc = json.loads(entry.value)
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"kv {entry.key!r} does not hold a JSON document") from None
        if not isinstance(doc, dict):
            raise InputError(f"kv {entry.key!r}: expected a JSON object")
        return RolloutState.from_dict(doc), entry.modify_index

    def create(self, state: RolloutState) -> int:
        """Write a new record; ConflictError when an active rollout already holds the key, or
        another process wrote one between this read and this write (two operators starting
        at once: the check-and-set lets exactly one win; the other is told whose it is)."""
        old, index = self.load(state.policy)
        if old is not None and old.active:
            raise self._taken(old, state.policy)
        try:
            return self._put(state, index)
        except ConflictError:
            now = self.load(state.policy)[0]
            if now is None or now.id == state.id:
                raise
            raise self._taken(now, state.policy, meanwhile=True) from None

    @staticmethod
    def _taken(old: RolloutState, policy: str, *, meanwhile: bool = False) -> ConflictError:
        who = " by another nomadscale a moment ago" if meanwhile else ""
        return ConflictError(
            f"deploy {policy}: rollout {old.id} of {old.image} is {phase_text(old.status)} "
            f"(started {old.started_at}{who}); use 'deploy status', 'deploy resume' or "
            "'deploy abort'",
            system="kv",
        )

    def save(self, state: RolloutState, index: int) -> int:
        """Write ``state`` if the record is still at ``index``; ConflictError when another
        process wrote it (this process must stop driving the rollout)."""
        return self._put(state, index)

    def _put(self, state: RolloutState, index: int) -> int:
        key = deploy_key(self.prefix, state.policy)
        data = json.dumps(state.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        if not self.kv.put(key, data, cas=index):
            raise ConflictError(
                f"deploy {state.policy}: the rollout record changed under us (another "
                "nomadscale is driving it)",
                system="kv",
            )
        entry = self.kv.get(key)
        return entry.modify_index if entry is not None else index

    # --- golden image ---------------------------------------------------------------------

    def golden_image(self, policy: str) -> str | None:
        entry = self.kv.get(golden_key(self.prefix, policy))
        return entry.value.decode() if entry is not None and entry.value else None

    def set_golden_image(self, policy: str, image: str) -> None:
        self.kv.put(golden_key(self.prefix, policy), image.encode())
        log.info("golden image of %s is now %s", policy, image)
