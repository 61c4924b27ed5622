"""Manual control state in KV: overrides, pauses and "apply now" kicks.

Layout (``prefix`` = ``settings.kv_prefix``):

* ``<prefix>/overrides/<policy>``: JSON list of ``Override.to_dict()`` (pause = kind pause);
  ``<prefix>/overrides/_all`` holds fleet-wide entries (``pause`` without a policy).
* ``<prefix>/kick/<policy>``: ``{"id", "who", "at", "reason"}``: the leader runs that policy's
  cycle at once when it sees a kick id it has not handled yet.
* ``<prefix>/deploy/<policy>/state``: written by the deploy rollout; while it is active the
  autoscaler leaves the target alone.

Every write goes through ``update_json`` (check-and-set) and is audited with who/when/why.
Expired entries are dropped on the next write.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from nomadscale.core.errors import ConflictError, InputError, UsageError
from nomadscale.core.ports import KVPort
from nomadscale.core.values import new_id
from nomadscale.integrations.consul import update_json
from nomadscale.stages.overrides import Override

ALL = "_all"
_DEPLOY_DONE = frozenset(
    {"", "idle", "done", "complete", "completed", "succeeded", "successful", "failed",
     "rolled_back", "rolled-back", "aborted", "cancelled", "canceled"}
)  # fmt: skip


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def _tolerant(value: bytes) -> tuple[list[Override], int]:
    """The readable overrides in a stored value, and how many entries could not be read."""
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return [], 1
    if not isinstance(raw, list):
        return [], 1
    good: list[Override] = []
    for d in raw:
        try:
            good.append(Override.from_dict(d))
        except InputError:
            continue
    return good, len(raw) - len(good)


def _get_json(kv: KVPort, key: str) -> Any:
    entry = kv.get(key)
    if entry is None or not entry.value:
        return None
    try:
        return json.loads(entry.value)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"kv {key!r} does not hold a JSON document") from None


class Control:
    """Read and change the manual-control state of every policy."""

    def __init__(self, kv: KVPort, *, prefix: str = "nomadscale") -> None:
        self.kv = kv
        self.prefix = prefix.strip("/")

    def overrides_key(self, policy: str) -> str:
        return f"{self.prefix}/overrides/{policy}"

    def kick_key(self, policy: str) -> str:
        return f"{self.prefix}/kick/{policy}"

    def deploy_key(self, policy: str) -> str:
        return f"{self.prefix}/deploy/{policy}/state"

    # --- reading ------------------------------------------------------------------------

    def _repair_hint(self, key: str) -> str:
        name = key.rsplit("/", 1)[-1]
        return "`nomadscale resume`" if name == ALL else f"`nomadscale override clear {name}`"

    def _load(self, key: str) -> list[Override]:
        try:
            raw = _get_json(self.kv, key) or []
        except InputError as e:
            raise InputError(f"{e} ({self._repair_hint(key)} resets it)") from None
        if not isinstance(raw, list):
            raise InputError(
                f"kv {key!r}: expected a list of overrides ({self._repair_hint(key)} resets it)"
            )
        try:
            return [Override.from_dict(d) for d in raw]
        except InputError as e:
            raise InputError(f"kv {key!r}: {e} ({self._repair_hint(key)} removes it)") from None

    def overrides(self, policy: str, *, now: datetime | None = None) -> list[Override]:
        """Entries for ``policy`` plus fleet-wide ones; only the active ones with ``now``."""
        found = self._load(self.overrides_key(policy))
        for o in self._load(self.overrides_key(ALL)):
            found.append(
                Override(
                    policy=policy, kind=o.kind, value=o.value, reason=o.reason, who=o.who,
                    created_at=o.created_at, expires_at=o.expires_at, source=o.source,
                )
            )  # fmt: skip
        if now is not None:
            found = [o for o in found if o.active(now)]
        return found

    def all_overrides(self, *, now: datetime | None = None) -> list[Override]:
        out: list[Override] = []
        for entry in self.kv.list(f"{self.prefix}/overrides/"):
            out.extend(self._load(entry.key))
        if now is not None:
            out = [o for o in out if o.active(now)]
        return out

    def paused(self, policy: str, *, now: datetime) -> Override | None:
        pauses = [o for o in self.overrides(policy, now=now) if o.kind == "pause"]
        return max(pauses, key=lambda o: o.created_at) if pauses else None

    def kick(self, policy: str) -> dict[str, Any] | None:
        doc = _get_json(self.kv, self.kick_key(policy))
        return doc if isinstance(doc, dict) else None

    def deploy_active(self, policy: str) -> str | None:
        """A one-line description when a deploy rollout record is active, else None."""
        doc = _get_json(self.kv, self.deploy_key(policy))
        if not isinstance(doc, dict):
            return None
        if doc.get("active") is False:
            return None
        status = str(doc.get("status") or doc.get("phase") or doc.get("state") or "")
        if doc.get("active") is True or status.lower() not in _DEPLOY_DONE:
            image = doc.get("image") or doc.get("target_image") or ""
            return f"deploy rollout {status or 'active'}" + (f" of {image}" if image else "")
        return None

    # --- writing ------------------------------------------------------------------------

    def _update(
        self, key: str, fn: Callable[[list[Override]], list[Override]], *, now: datetime
    ) -> list[Override]:
        def apply(old: Any) -> Any:
            if not isinstance(old, list):
                raise InputError(
                    f"kv {key!r}: expected a list of overrides ({self._repair_hint(key)} resets it)"
                )
            try:
                current = [Override.from_dict(d) for d in old]
            except InputError as e:
                raise InputError(f"kv {key!r}: {e} ({self._repair_hint(key)} removes it)") from None
            current = [o for o in current if o.expires_at is None or o.expires_at > now]
            return [o.to_dict() for o in fn(current)]

        return [Override.from_dict(d) for d in update_json(self.kv, key, apply, default=[])]

    def set_override(
        self,
        policy: str,
        *,
        kind: str,
        value: int | None,
        reason: str,
        now: datetime,
        duration: timedelta | None,
        who: str | None = None,
        source: str = "cli",
    ) -> Override:
        """Add an override; an earlier one of the same kind from the same source is replaced."""
        if not reason.strip():
            raise UsageError("--reason: say why (it is recorded with the override)")
        if duration is not None and duration <= timedelta(0):
            raise UsageError("--for: must be longer than 0s")
        new = Override(
            policy=policy,
            kind=kind,  # type: ignore[arg-type]
            value=value,
            reason=reason.strip(),
            who=who or whoami(),
            created_at=now,
            expires_at=None if duration is None else now + duration,
            source=source,  # type: ignore[arg-type]
        )
        key = self.overrides_key(policy)
        self._update(
            key,
            lambda cur: [o for o in cur if not (o.kind == kind and o.source == source)] + [new],
            now=now,
        )
        return new

    def clear(self, policy: str, *, now: datetime, kinds: tuple[str, ...] = ()) -> int:
        """Remove overrides of ``policy`` (only ``kinds`` when given); returns how many.

        Works on a damaged key too (not JSON, not a list, malformed entries): whatever cannot
        be read is removed and counted, so the CLI can always repair what it wrote.
        """
        key = self.overrides_key(policy)
        for _ in range(20):
            entry = self.kv.get(key)
            if entry is None or not entry.value:
                return 0
            current, broken = _tolerant(entry.value)
            live = [o for o in current if o.expires_at is None or o.expires_at > now]
            keep = [o for o in live if kinds and o.kind not in kinds]
            removed = len(live) - len(keep) + broken
            data = json.dumps([o.to_dict() for o in keep], sort_keys=True, separators=(",", ":"))
            if self.kv.put(key, data.encode(), cas=entry.modify_index):
                return removed
        raise ConflictError(
            f"kv {key!r}: gave up after 20 concurrent-update conflicts", system="kv"
        )

    def pause(
        self, policy: str | None, *, reason: str, now: datetime, duration: timedelta | None,
        who: str | None = None,
    ) -> Override:  # fmt: skip
        return self.set_override(
            policy or ALL, kind="pause", value=None, reason=reason, now=now,
            duration=duration, who=who,
        )  # fmt: skip

    def resume(self, policy: str | None, *, now: datetime) -> int:
        return self.clear(policy or ALL, now=now, kinds=("pause",))

    def request_kick(
        self, policy: str, *, reason: str, now: datetime, who: str | None = None
    ) -> str:
        kick_id = new_id()
        doc = {"id": kick_id, "who": who or whoami(), "at": now.isoformat(), "reason": reason}
        update_json(self.kv, self.kick_key(policy), lambda _old: doc)
        return kick_id
