"""Fault injection for the twin: failing, slow or dropped requests, no leader, bad images,
failing image pulls.

Endpoint patterns are regular expressions searched in ``"METHOD /v1/path"`` (query string
excluded), e.g. ``"/v1/job/.*/scale"``, ``"^POST /v1/node/"`` or ``"/v1/nodes$"``.
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
    ) -> None:
        """Answer matching requests with ``status`` (plain-text body) ``times`` times."""
        text = message or ("rpc error: simulated failure" if status >= 500 else "bad request")
        with self._lock:
            self._rules.append(
                _Rule(
                    re.compile(endpoint_pattern), "fail", status=status, message=text, times=times
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
                    return Decision(fail=(rule.status, rule.message), latency_s=latency)
        return Decision(latency_s=latency)
