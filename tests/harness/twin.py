"""Pytest plugin: the Nomad twin over real HTTP on loopback.

Fixtures:
* ``twin``: a started 6-node, two-zone (zone-a, zone-b) GPU twin with a FakeClock; stopped
  after the test. Exposes ``cluster``, ``address``, ``clock``, ``server`` and ``nomad()``.
* ``twin_factory(**Cluster.build kwargs)``: more twins with other shapes (same cleanup).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from nomadscale.core.clock import Clock, FakeClock
from nomadscale.sim import Cluster, TwinServer


@dataclass
class Twin:
    cluster: Cluster
    server: TwinServer
    clock: Clock  # a FakeClock unless the test passed another clock

    @property
    def address(self) -> str:
        return self.server.address

    def advance(self, seconds: float) -> None:
        """Move virtual time (FakeClock only) and apply everything due."""
        self.cluster.advance(seconds)

    def nomad(self, **kwargs: Any) -> Any:
        """A python-nomad client pointed at this twin."""
        import nomad

        return nomad.Nomad(address=self.address, **kwargs)


TwinFactory = Callable[..., Twin]


@pytest.fixture
def twin_factory() -> Iterator[TwinFactory]:
    started: list[Twin] = []

    def make(**kwargs: Any) -> Twin:
        kwargs.setdefault("nodes", 6)
        kwargs.setdefault("zones", ("zone-a", "zone-b"))
        clock = kwargs.setdefault("clock", FakeClock())
        cluster = Cluster.build(**kwargs)
        server = TwinServer(cluster, host="127.0.0.1", port=0).start()
        t = Twin(cluster=cluster, server=server, clock=clock)
        started.append(t)
        return t

    yield make
    for t in started:
        t.server.stop()


@pytest.fixture
def twin(twin_factory: TwinFactory) -> Twin:
    return twin_factory()
