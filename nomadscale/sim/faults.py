"""Fault injection for the twin: failing, slow or dropped requests, no leader, bad images,
failing image pulls; and for its Compute Engine endpoint (``ComputeFaults``): zone operations
that never finish or end in error, and zones that cannot create instances (stockout, quota).

Endpoint patterns are regular expressions searched in ``"METHOD /path"`` (query string
excluded), e.g. ``"/v1/job/.*/scale"``, ``"^POST /v1/node/"``, ``"/v1/nodes$"`` or
``"^POST .*/instanceGroupManagers/mig-a/resize$"``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass


@dataclass
class _Rule:
    pattern: re.Pattern[str]
    kind: str  # fail / latency / drop
    status: int = 500
    message: str = ""
    seconds: float = 0.0
    times: int | None = None  # None = forever
    retry_after: str | None = None  # a Retry-After header on a ``fail`` reply

    def take(self) -> bool:
        if self.times is None:
            return True
        if self.times <= 0:
            return False
        self.times -= 1
        return True


@dataclass
class _PullRule:
    node_id: str | None  # None = any node
    image_substring: str  # "" = any image
    times: int | None  # None = forever

    def matches(self, node_id: str, image: str) -> bool:
        if self.node_id is not None and self.node_id != node_id:
            return False
        return self.image_substring in image and (self.times is None or self.times > 0)


@dataclass(frozen=True)
class Decision:
    fail: tuple[int, str] | None = None
    drop: bool = False
    latency_s: float = 0.0
    retry_after: str | None = None  # with ``fail``: the Retry-After header to send


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._no_leader = False
        self._unhealthy: list[str] = []
        self._pulls: list[_PullRule] = []
        self.hits: list[str] = []  # "kind METHOD /path" of every fault applied

    def fail(
        self,
        endpoint_pattern: str,
        status: int = 500,
        times: int | None = None,
        message: str = "",
        retry_after: str | float | None = None,
    ) -> None:
        """Answer matching requests with ``status`` ``times`` times (the Nomad twin: a
        plain-text body; the Compute endpoint: GCE's JSON error body), with a ``Retry-After``
        header when given (seconds or an HTTP date, RFC 9110 10.2.3)."""
        text = message or ("rpc error: simulated failure" if status >= 500 else "bad request")
        after = None if retry_after is None else str(retry_after)
        with self._lock:
            self._rules.append(
                _Rule(
                    re.compile(endpoint_pattern),
                    "fail",
                    status=status,
                    message=text,
                    times=times,
                    retry_after=after,
                )
            )

    def latency(self, pattern: str, seconds: float, times: int | None = None) -> None:
        """Delay matching requests by ``seconds`` of real time."""
        with self._lock:
            self._rules.append(_Rule(re.compile(pattern), "latency", seconds=seconds, times=times))

    def drop(self, pattern: str, times: int | None = 1) -> None:
        """Close the connection without answering."""
        with self._lock:
            self._rules.append(_Rule(re.compile(pattern), "drop", times=times))

    def no_leader(self, on: bool = True) -> None:
        """While on, every request needing the leader gets 500 ``No cluster leader``."""
        with self._lock:
            self._no_leader = on

    @property
    def leaderless(self) -> bool:
        return self._no_leader

    def unhealthy_image(self, image_substring: str) -> None:
        """Allocations whose task image contains ``image_substring`` fail after starting."""
        with self._lock:
            self._unhealthy.append(image_substring)

    def image_is_bad(self, image: str) -> bool:
        with self._lock:
            return any(s in image for s in self._unhealthy)

    def pull_fails(
        self, node_id: str | None = None, image_substring: str = "", times: int | None = None
    ) -> None:
        """Image pulls on ``node_id`` (any node if None) of images containing
        ``image_substring`` fail ``times`` times (forever if None): the allocation goes
        ``failed`` with a ``Driver Failure`` task event halfway through the pull, and the image
        does not reach the node's cache. Images already cached need no pull and still start."""
        with self._lock:
            self._pulls.append(_PullRule(node_id, image_substring, times))

    def take_pull_failure(self, node_id: str, image: str) -> bool:
        """Whether this pull fails (consumes one of the rule's ``times``)."""
        with self._lock:
            for rule in self._pulls:
                if rule.matches(node_id, image):
                    if rule.times is not None:
                        rule.times -= 1
                    self.hits.append(f"pull_fails {node_id} {image}")
                    return True
            return False

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._unhealthy.clear()
            self._pulls.clear()
            self._no_leader = False

    def check(self, method: str, path: str) -> Decision:
        target = f"{method} {path}"
        latency = 0.0
        with self._lock:
            for rule in self._rules:
                if not rule.pattern.search(target):
                    continue
                if rule.kind == "latency":
                    if rule.take():
                        latency += rule.seconds
                        self.hits.append(f"latency {target}")
                elif rule.take():
                    self.hits.append(f"{rule.kind} {target}")
                    if rule.kind == "drop":
                        return Decision(drop=True, latency_s=latency)
                    return Decision(fail=(rule.status, rule.message), latency_s=latency,
                                    retry_after=rule.retry_after)  # fmt: skip
        return Decision(latency_s=latency)


# --- Compute Engine -------------------------------------------------------------------------

# Real GCE's texts for the two ways a zone refuses to create an instance (the code is what
# ``lastAttempt.errors.errors[].code`` of listManagedInstances carries).
STOCKOUT = "ZONE_RESOURCE_POOL_EXHAUSTED"
QUOTA = "QUOTA_EXCEEDED"
_MESSAGES = {
    STOCKOUT: "The zone 'projects/{project}/zones/{zone}' does not have enough resources "
    "available to fulfill the request. Try a different zone, or try again later.",
    QUOTA: "Quota 'NVIDIA_L4_GPUS' exceeded. Limit: 8.0 in region {region}.",
}


@dataclass
class _OpRule:
    pattern: re.Pattern[str]
    ends: str  # "error" (DONE with an error) or "never" (RUNNING forever)
    apply: bool  # whether the write itself happens
    times: int | None
    code: str
    message: str


@dataclass(frozen=True)
class OperationFault:
    ends: str
    apply: bool
    code: str
    message: str


@dataclass
class _Stockout:
    available: int  # instances the zone can still create
    code: str
    message: str


class ComputeFaults(FaultInjector):
    """The Compute endpoint's faults (``nomadscale.sim.compute``): everything
    ``FaultInjector`` does on ``"METHOD /compute/v1/..."`` paths, plus

    * ``operation``: the zone operation of a matching write stays ``RUNNING`` forever or ends
      ``DONE`` with an ``error`` (its ``errors[].code``/``message``), applied or not;
    * ``stockout``: a zone creates at most ``available`` more instances; the MIG's others stay
      ``CREATING`` with ``lastAttempt.errors`` (``ZONE_RESOURCE_POOL_EXHAUSTED`` or
      ``QUOTA_EXCEEDED``) and no VM, and are created once ``restock`` lifts it, as a MIG
      retries a failed creation until it succeeds.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ops: list[_OpRule] = []
        self._stockouts: dict[str, _Stockout] = {}

    def operation(
        self,
        pattern: str,
        *,
        ends: str,
        apply: bool = True,
        times: int | None = 1,
        code: str = "RESOURCE_NOT_READY",
        message: str = "simulated operation error",
    ) -> None:
        if ends not in ("error", "never"):
            raise ValueError(f"ends must be 'error' or 'never', got {ends!r}")
        with self._lock:
            self._ops.append(_OpRule(re.compile(pattern), ends, apply, times, code, message))

    def take_operation(self, method: str, path: str) -> OperationFault | None:
        target = f"{method} {path}"
        with self._lock:
            for rule in self._ops:
                if rule.pattern.search(target) and (rule.times is None or rule.times > 0):
                    if rule.times is not None:
                        rule.times -= 1
                    self.hits.append(f"operation-{rule.ends} {target}")
                    return OperationFault(rule.ends, rule.apply, rule.code, rule.message)
        return None

    def stockout(
        self, zone: str, *, available: int = 0, code: str = STOCKOUT, message: str = ""
    ) -> None:
        """From now on ``zone`` creates at most ``available`` more instances."""
        with self._lock:
            self._stockouts[zone] = _Stockout(max(0, available), code, message)

    def restock(self, zone: str) -> None:
        """``zone`` creates instances again (the MIGs create the ones they were retrying)."""
        with self._lock:
            self._stockouts.pop(zone, None)

    def take_creation(self, zone: str, *, project: str) -> tuple[str, str] | None:
        """Whether one more instance can be created in ``zone`` now (consumes one of the
        ``available``): None when it can, else the error ``(code, message)``."""
        with self._lock:
            out = self._stockouts.get(zone)
            if out is None:
                return None
            if out.available > 0:
                out.available -= 1
                return None
            region = zone.rsplit("-", 1)[0]
            text = out.message or _MESSAGES.get(out.code, "simulated creation failure")
            return out.code, text.format(project=project, zone=zone, region=region)

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self._ops.clear()
            self._stockouts.clear()
