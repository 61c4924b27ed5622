"""Building blocks for the chaos suite: fault injectors the twin lacks, demand in a real
Prometheus, the service as a real process, and small polling helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nomadscale.sim.faults import Decision as FaultDecision
from nomadscale.sim.faults import FaultInjector
from tests.harness.promdata import Series

ROOT = Path(__file__).resolve().parents[2]


class HoldNthScale(FaultInjector):
    """The twin's faults plus: the ``nth`` Scale API call of ``job`` hangs (``holding`` is set)
    until ``release`` is set, then its connection is dropped without being applied: the caller
    died between two zones' scale calls. The twin has no "only the 2nd call" latency rule."""

    def __init__(self, job: str, nth: int = 2, hold_s: float = 60.0) -> None:
        super().__init__()
        self.pattern = re.compile(rf"^POST /v1/job/{re.escape(job)}/scale$")
        self.nth, self.hold_s = nth, hold_s
        self.seen = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    def check(self, method: str, path: str) -> FaultDecision:
        if self.pattern.search(f"{method} {path}"):
            with self._lock:
                self.seen += 1
                mine = self.seen == self.nth
            if mine:
                self.holding.set()
                self.release.wait(self.hold_s)
                self.hits.append(f"hold+drop {method} {path}")
                return FaultDecision(drop=True)
        return super().check(method, path)


def level_series(
    level: float, *, start: float, end: float, step_s: float = 15.0, name: str = "demand"
) -> Series:
    ts = np.arange(start, end, step_s)
    return Series(name, {}, ts, np.full(len(ts), float(level)))


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def service_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))}
    base.pop("PROMETHEUS_URL", None)
    return {**base, "PYTHONPATH": str(ROOT), **extra}


def start_service(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m nomadscale run ARGS`` as a real process, stderr to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "nomadscale", "run", *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class Drift:
    """Someone else keeps setting ``group`` back to ``count`` (every ``every_s``), so every
    cycle of a leader has a write to make. Its own scale events carry no nomadscale meta."""

    def __init__(self, address: str, *, job: str, namespace: str, group: str, count: int = 1,
                 every_s: float = 0.3) -> None:  # fmt: skip
        from nomadscale.integrations.nomad import NomadClient

        self.nomad = NomadClient(address=address, max_retries=1, timeout=2)
        self.job, self.namespace, self.group, self.count = job, namespace, group, count
        self.every_s = every_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, name="drift", daemon=True)

    def _loop(self) -> None:
        from nomadscale.core.errors import NomadscaleError

        while not self._stop.wait(self.every_s):
            try:
                st = self.nomad.job_status(self.job, namespace=self.namespace)
                if st.groups[self.group].desired != self.count:
                    self.nomad.scale(self.job, self.group, self.count, message="drift",
                                     namespace=self.namespace)  # fmt: skip
            except NomadscaleError:
                continue

    def __enter__(self) -> Drift:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


def leader_scale_times(cluster: Any) -> list[Any]:
    """Times of the twin's scale events written by nomadscale (decision id in the meta)."""
    return [
        e["time"]
        for e in list(cluster.events)
        if e["type"] == "scale" and (e.get("meta") or {}).get("nomadscale.decision_id")
    ]
