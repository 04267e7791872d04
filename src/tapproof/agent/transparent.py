"""Transparent interception (root, Linux): iptables REDIRECT into the agent, ``SO_ORIGINAL_DST`` back out.

Rules (nat table, one dedicated chain per hook, so install/remove is exact)::

    OUTPUT     -p tcp -j TAPPROOF-OUTPUT
    TAPPROOF-OUTPUT      -m mark --mark MARK          -j RETURN   # the agent's own sockets
                         -m owner --uid-owner UID     -j RETURN   # (when the agent has its own user)
                         -o lo                        -j RETURN   # local traffic never
                         -p tcp -d CIDR               -j REDIRECT --to-ports TRANSPARENT_PORT   # per fleet CIDR
    PREROUTING -p tcp -j TAPPROOF-PREROUTING
    TAPPROOF-PREROUTING  -p tcp --dport PORT          -j REDIRECT --to-ports INBOUND_PORT       # per protected port

IPv4 CIDRs go to ``iptables``, IPv6 CIDRs to ``ip6tables`` (same chains);
:func:`original_dst` reads ``SO_ORIGINAL_DST`` or ``IP6T_SO_ORIGINAL_DST``.

Not looping: the agent's outbound sockets carry ``SO_MARK`` (:func:`mark_socket`,
needs CAP_NET_ADMIN, which an agent installing rules has) and marked packets
RETURN before any REDIRECT; an agent running as its own user can instead (or
also) be excluded by ``agent_uid``.

Why a crash never black-holes traffic:

* the rules only ever REDIRECT to a *local port*; they never DROP. With no
  agent listening there, the kernel answers the SYN with a RST: clients get
  an immediate "connection refused", not a hang, and nothing is silently lost;
* :meth:`Redirector.install` and :meth:`Redirector.repair` first remove every
  ``TAPPROOF-*`` chain and jump (from any earlier, crashed run) before adding
  theirs, so a restart converges to exactly one rule set;
* :meth:`Redirector.remove` runs on clean exit, and for a crash the unit file
  runs the repair: ``ExecStopPost=/usr/bin/python3 -m tapproof.agent.transparent --repair``
  (exit 0 when no rule is left);
* all rules live in the nat table, which only sees the first packet of a
  connection: established flows are never affected by install or remove.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence

from tapproof.errors import ConfigError, TapproofError

__all__ = [
    "CHAIN_PREFIX",
    "DEFAULT_MARK",
    "Redirector",
    "TransparentError",
    "mark_socket",
    "original_dst",
]

log = logging.getLogger(__name__)

CHAIN_PREFIX = "TAPPROOF-"
OUT_CHAIN = "TAPPROOF-OUTPUT"
IN_CHAIN = "TAPPROOF-PREROUTING"
DEFAULT_MARK = 0x7470  # "tp"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SO_MARK = getattr(socket, "SO_MARK", 36)
_HOOKS = {OUT_CHAIN: "OUTPUT", IN_CHAIN: "PREROUTING"}
_MAX_DUPLICATE_JUMPS = 64  # bound on removing repeated jumps left by broken runs


class TransparentError(TapproofError, OSError):
    """Rules could not be installed or removed, or a socket has no original destination.

    Also an :class:`OSError`, so a connection handler that already catches
    socket errors also catches a missing original destination.
    """


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a redirected connection was addressed to, before REDIRECT rewrote it."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            addr = ipaddress.IPv6Address(raw[8:24])
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped), port
            return str(addr), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        raise TransparentError(f"no original destination on this socket: {exc.strerror}") from exc
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def mark_socket(sock: socket.socket, mark: int = DEFAULT_MARK) -> None:
    """Set ``SO_MARK`` so the transparent rules let this (agent-owned) socket through; call before connect."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise TransparentError(f"cannot set SO_MARK (needs CAP_NET_ADMIN): {exc.strerror}") from exc


def _tools(families: Sequence[int]) -> list[str]:
    out = []
    for fam in families:
        tool = "iptables" if fam == 4 else "ip6tables"
        if shutil.which(tool) is None:
            raise TransparentError(f"{tool} not found on PATH (apt-get install iptables)")
        out.append(tool)
    return out


def _ipt(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [tool, "-w", "5", "-t", "nat", *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransparentError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise TransparentError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def _remove_all(tool: str) -> bool:
    """Remove every jump to and every ``TAPPROOF-*`` chain; True if something was removed."""
    listing = _ipt(tool, "-S", check=False)
    if listing.returncode != 0:  # no nat table for this family (e.g. no ip6tables nat): nothing to remove
        return False
    removed = False
    chains: list[str] = []
    jumps: list[list[str]] = []
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-N" and parts[1].startswith(CHAIN_PREFIX):
            chains.append(parts[1])
        elif (
            len(parts) >= 2
            and parts[0] == "-A"
            and not parts[1].startswith(CHAIN_PREFIX)
            and "-j" in parts
            and parts[parts.index("-j") + 1].startswith(CHAIN_PREFIX)
        ):
            jumps.append(parts[1:])
    for spec in jumps[:_MAX_DUPLICATE_JUMPS]:
        _ipt(tool, "-D", *spec, check=False)
        removed = True
    for chain in chains:
        _ipt(tool, "-F", chain, check=False)
    for chain in chains:
        _ipt(tool, "-X", chain, check=False)
        removed = True
    return removed


class Redirector:
    """Install and remove the transparent-mode rules for one agent."""

    def __init__(
        self,
        *,
        transparent_port: int,
        fleet_cidrs: Sequence[str],
        protected_ports: Sequence[int] = (),
        inbound_port: int | None = None,
        agent_uid: int | None = None,
        mark: int = DEFAULT_MARK,
    ) -> None:
        """Check the settings (a :class:`ConfigError` names the flag at fault); install nothing yet."""
        if not 0 < transparent_port < 65536:
            raise ConfigError(f"--transparent-port: {transparent_port} is not a TCP port")
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for cidr in fleet_cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise ConfigError(f"--fleet-cidr: {cidr!r} is not a CIDR") from exc
        for p in protected_ports:
            if not 0 < p < 65536:
                raise ConfigError(f"protected port {p} is not a TCP port")
        if protected_ports and inbound_port is None:
            raise ConfigError("protected ports need the agent's inbound port")
        if inbound_port is not None and not 0 < inbound_port < 65536:
            raise ConfigError(f"inbound port {inbound_port} is not a TCP port")
        if not 0 < mark < 2**32:
            raise ConfigError(f"mark {mark:#x} must be a non-zero 32-bit value")
        self.transparent_port = transparent_port
        self.fleet = nets
        self.protected_ports = tuple(protected_ports)
        self.inbound_port = inbound_port
        self.agent_uid = agent_uid
        self.mark = mark
        self.installed = False

    def families(self) -> list[int]:
        """IP versions the rules touch (4 always; 6 when an IPv6 CIDR is configured)."""
        fams = [4]
        if any(n.version == 6 for n in self.fleet):
            fams.append(6)
        return fams

    def rules(self, family: int = 4) -> list[list[str]]:
        """The ``-A`` rule specs for one IP version, in order (without the table); also the test oracle."""
        out: list[list[str]] = []
        oc = OUT_CHAIN
        out.append([oc, "-m", "mark", "--mark", f"{self.mark:#x}", "-j", "RETURN"])
        if self.agent_uid is not None:
            out.append([oc, "-m", "owner", "--uid-owner", str(self.agent_uid), "-j", "RETURN"])
        out.append([oc, "-o", "lo", "-j", "RETURN"])
        for net in self.fleet:
            if net.version == family:
                port = str(self.transparent_port)
                out.append([oc, "-p", "tcp", "-d", str(net), "-j", "REDIRECT", "--to-ports", port])
        if self.inbound_port is not None:
            for p in self.protected_ports:
                spec = ["-p", "tcp", "--dport", str(p), "-j", "REDIRECT", "--to-ports", str(self.inbound_port)]
                out.append([IN_CHAIN, *spec])
        return out

    def install(self) -> None:
        """Remove leftovers of any earlier run, then add the chains, rules and jumps (idempotent)."""
        tools = _tools(self.families())
        for tool in tools:
            _remove_all(tool)
        try:
            for fam, tool in zip(self.families(), tools, strict=True):
                for chain in _HOOKS:
                    _ipt(tool, "-N", chain)
                for spec in self.rules(fam):
                    _ipt(tool, "-A", *spec)
                # Jumps last: until they exist the chains are inert.
                for chain, hook in _HOOKS.items():
                    _ipt(tool, "-I", hook, "1", "-p", "tcp", "-j", chain)
        except BaseException:
            for tool in tools:
                _remove_all(tool)
            raise
        self.installed = True
        log.info(
            "transparent-rules-installed",
            extra={
                "event": "transparent-rules-installed",
                "fleet": [str(n) for n in self.fleet],
                "transparent_port": self.transparent_port,
                "protected_ports": list(self.protected_ports),
                "inbound_port": self.inbound_port,
            },
        )

    def remove(self) -> None:
        """Remove the jumps and chains (also those of other runs); safe when nothing is installed."""
        for tool in _tools(self.families()):
            _remove_all(tool)
        self.installed = False
        # Without the rules, applications on this host reach fleet addresses directly, in plaintext,
        # and inbound plaintext to protected ports is no longer refused: say so loudly.
        log.warning(
            "transparent-rules-removed: traffic to fleet addresses is no longer tunnelled",
            extra={"event": "transparent-rules-removed"},
        )

    @classmethod
    def repair(cls) -> bool:
        """Remove every ``TAPPROOF-*`` chain and jump a crashed run left (IPv4 and, if present, IPv6).

        Returns True when something was removed.
        """
        removed = False
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is not None:
                removed = _remove_all(tool) or removed
        if removed:
            log.warning("transparent-rules-repaired", extra={"event": "transparent-rules-repaired"})
        return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tapproof.agent.transparent --repair``: for ExecStopPost; exit 0 when no rule is left."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--repair"]:
        log.error("usage: python -m tapproof.agent.transparent --repair  (removes TAPPROOF-* iptables rules)")
        return 2
    try:
        Redirector.repair()
    except TransparentError:
        log.exception("transparent-repair-failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
