"""The Nomad twin: a simulated Nomad cluster served over Nomad's HTTP API.

cluster = Cluster.build(nodes=6, clock=FakeClock())
twin = TwinServer(cluster).start()   # twin.address -> "http://127.0.0.1:PORT"
cluster.advance(120)                 # FakeClock: move virtual time, apply due changes
"""

from nomadscale.sim.cluster import Cluster
from nomadscale.sim.faults import FaultInjector
from nomadscale.sim.server import TwinServer

__all__ = ["Cluster", "FaultInjector", "TwinServer"]
