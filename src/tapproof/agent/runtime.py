"""What every part of a running agent shares: identity, credentials, policy, registry, tunnels, config.

One object, built by the daemon and handed to the listeners and the sync
loop. Readers take the current value of each field without locking (every
value is immutable and swapped whole); the config is swapped by SIGHUP.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from typing import TYPE_CHECKING

from tapproof.agent.config import AgentConfig
from tapproof.agent.credstore import CredStore
from tapproof.agent.policycache import PolicyCache
from tapproof.agent.registry import RegistryCache
from tapproof.agent.state import AgentPaths
from tapproof.agent.tunnels import TunnelTable
from tapproof.identity import SpiffeID, host_id
from tapproof.tls.sessions import SessionStore
from tapproof.units import parse_hostport

if TYPE_CHECKING:
    from tapproof.agent.muxpool import MuxPool

__all__ = ["Runtime"]


@dataclasses.dataclass
class Runtime:
    """The shared state of one agent process."""

    paths: AgentPaths
    trust_domain: str
    host: str
    config: AgentConfig
    creds: CredStore
    policy: PolicyCache
    registry: RegistryCache
    tunnels: TunnelTable = dataclasses.field(default_factory=TunnelTable)
    sessions: SessionStore = dataclasses.field(default_factory=SessionStore)  # outbound TLS resumption
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    control_plane_up: bool = False
    last_sync: dt.datetime | None = None
    tunnel_address: str = ""  # the bound listeners (HOST:PORT), set as each one binds
    admin_address: str = ""
    transparent_address: str = ""
    inbound_address: str = ""
    mark: int | None = None  # SO_MARK for our outbound sockets in transparent mode (not redirected)
    advertise: str = ""
    mux_pool: MuxPool | None = None  # outbound mux connections (--mux), made on first use

    @property
    def spiffe_id(self) -> SpiffeID:
        """This agent's identity."""
        return host_id(self.trust_domain, self.host)

    def own_ports(self) -> set[int]:
        """The ports of this agent's own listeners (bound ones, and the configured transparent port):
        never a protected port, never what an address target may reach."""
        bound = (self.tunnel_address, self.admin_address, self.transparent_address, self.inbound_address)
        ports = {parse_hostport(a, allow_zero=True)[1] for a in bound if a}
        ports.add(self.config.transparent_port)
        return ports

    @staticmethod
    def now() -> dt.datetime:
        """Wall-clock UTC (certificate checks)."""
        return dt.datetime.now(dt.UTC)
