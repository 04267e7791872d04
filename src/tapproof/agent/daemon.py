"""``tapproof agent run``: wire credentials, caches, listeners, sync loop and admin endpoint together.

Start-up order: enroll if needed -> load identity, credentials, cached policy
and registry -> bind the tunnel port (its address is what we advertise) ->
one synchronous sync round (register, policy, revocations, registry; skipped
quietly if the control plane is down: the caches serve) -> start the inbound,
route and transparent listeners, the admin endpoint and the sync loop ->
write ``A/run/address.json`` (every bound address, for tests and tools).

Signals: SIGTERM/SIGINT stop accepting, wait up to ``drain_timeout`` for live
tunnels, abort the rest, remove transparent rules, exit 0. SIGHUP re-reads
the config file (routes, services, mode, intervals); an invalid file keeps
the running config (the reason is logged). Listen addresses need a restart.

Data-plane design
-----------------
Classic tunnels (the default; ``--mux`` carries streams over pooled connections
instead, see :mod:`tapproof.agent.muxpool`): one thread per tunnel, from accept to close: the accept loops only accept
(:mod:`tapproof.listener`); a worker does the handshake (with its own
deadline), the peer and policy checks and the ``CONNECT`` exchange, then runs
:class:`tapproof.tunnel.relay.Relay` on the same thread. The relay is the fast
path: one ``poll`` loop per tunnel driving both directions through direct
``SSL_read``/``SSL_write`` cffi calls on buffers that start at 16 KiB and grow
to 256 KiB on bulk traffic, no per-byte Python work; cffi and the socket module release the GIL, so tunnels
on different threads use both cores. Its docstring has the measurements
(``bench/relay_speed.py``: ~5.7 Gbit/s both directions summed over one
connection on this project's 2 noisy vCPUs, ~92% of a plaintext Python relay,
1.7x a two-threads-per-tunnel design). Per-connection setup is kept cheap:
TLS contexts are built once per credential/bundle generation
(:mod:`tapproof.agent.credstore`), so a tunnel costs one mutual
X25519MLKEM768 handshake (resumed when a ticket is at hand, psk_dhe_ke only;
the peer is checked against the current revocations either way), one thread
start and one policy evaluation on immutable snapshots.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tapproof.agent import config as agent_config
from tapproof.agent.adminhttp import AdminServer
from tapproof.agent.config import AgentConfig, Route
from tapproof.agent.credstore import CredStore
from tapproof.agent.enroll import enroll
from tapproof.agent.inbound import InboundHandler
from tapproof.agent.metrics import UNSAFE_CLASSICAL_GROUPS, refused
from tapproof.agent.outbound import RouteHandler, TransparentHandler
from tapproof.agent.plaininbound import PlainInbound
from tapproof.agent.policycache import PolicyCache
from tapproof.agent.registry import RegistryCache
from tapproof.agent.runtime import Runtime
from tapproof.agent.state import AgentPaths, load_identity
from tapproof.agent.sync import SyncLoop
from tapproof.errors import ConfigError, TapproofError
from tapproof.fsutil import ensure_private_dir, write_atomic
from tapproof.listener import STACK_SIZE, Listener, bind, raise_limits
from tapproof.logs import log_event
from tapproof.tls import unsafe
from tapproof.units import format_hostport, parse_hostport

log = logging.getLogger(__name__)

__all__ = ["Agent", "run"]

SIGNAL_POLL = 0.25
"""Seconds between the main thread's wake-ups to run pending signal handlers (see :meth:`Agent.serve`)."""

# Settings a SIGHUP cannot change (sockets and rules are set up once).
_RESTART_ONLY = (
    "listen_tunnel",
    "advertise",
    "admin",
    "transparent",
    "transparent_port",
    "fleet_cidrs",
    "protected_ports",
    "inbound_port",
)


def run_file(data_dir: Path) -> Path:
    """``A/run/address.json``."""
    return Path(data_dir) / "run" / "address.json"


class Agent:
    """One running agent (also usable in-process by tests: :meth:`start` / :meth:`stop`)."""

    def __init__(self, data_dir: Path, cfg: AgentConfig, config_file: Path | None, overrides: dict[str, Any]):
        self.paths = AgentPaths(Path(data_dir))
        self.config_file = config_file
        self.overrides = overrides
        ident = load_identity(self.paths)
        creds = CredStore(self.paths, unsafe_classical_groups=cfg.unsafe_classical_groups)
        sid = creds.current.creds.spiffe_id
        if sid.name != ident.host:
            raise ConfigError(f"--data-dir: certificate is for {sid}, agent.toml says host {ident.host}")
        self.rt = Runtime(
            paths=self.paths,
            trust_domain=ident.trust_domain,
            host=ident.host,
            config=cfg,
            creds=creds,
            policy=PolicyCache(self.paths.root / "policy.json"),
            registry=RegistryCache(self.paths.root / "registry.json"),
        )
        self.tunnel: Listener | None = None
        self.routes: dict[Route, Listener] = {}
        self.transparent: Listener | None = None
        self.plain: Listener | None = None  # transparent mode: plaintext inbound to protected ports
        self.plain_handler: PlainInbound | None = None
        self.redirector: Any = None
        self.admin: AdminServer | None = None
        self.sync: SyncLoop | None = None
        self._reload = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # --- start ----------------------------------------------------------------------
    def start(self) -> None:
        """Bind everything, sync once, start serving; write the address file."""
        rt, cfg = self.rt, self.rt.config
        host, port = parse_hostport(cfg.listen_tunnel, what="--listen-tunnel", allow_zero=True)
        tsock = bind(host, port, what="--listen-tunnel")
        self.tunnel = Listener(tsock, InboundHandler(rt), name="tunnel", on_refuse=refused("inbound"))
        rt.tunnel_address = self.tunnel.address
        rt.advertise = cfg.advertise or _default_advertise(self.tunnel.address)
        try:
            if cfg.admin:
                ahost, aport = parse_hostport(cfg.admin, what="--admin", allow_zero=True)
                if not agent_config.is_loopback(ahost):
                    log_event(log, "admin-not-loopback", level=logging.WARNING, admin=cfg.admin)
                self.admin = AdminServer(ahost, aport, self.health, self.status)
                rt.admin_address = self.admin.address
            for route in cfg.routes:
                self.routes[route] = self._route_listener(route)
            self.sync = SyncLoop(rt)
            self.sync.sync_once()  # best effort: the caches serve if the control plane is down
            if cfg.transparent:
                self._start_transparent()
        except BaseException:
            self._close_all()
            raise
        self.tunnel.start()
        for lst in self.routes.values():
            lst.start()
        if self.admin is not None:
            self.admin.start()
        self.sync.start()
        self._write_run_file()
        UNSAFE_CLASSICAL_GROUPS.set(1 if cfg.unsafe_classical_groups else 0)
        if cfg.unsafe_classical_groups:
            log_event(log, "unsafe-classical-groups", level=logging.WARNING, warning=unsafe.WARNING)
        log_event(
            log,
            "agent-started",
            spiffe_id=str(rt.spiffe_id),
            tunnel=rt.tunnel_address,
            advertise=rt.advertise,
            admin=rt.admin_address or None,
            routes={str(r): lst.address for r, lst in self.routes.items()},
            services={s.name: s.target for s in cfg.services},
            mode=cfg.mode,
            transparent=cfg.transparent,
            not_after=rt.creds.current.not_after,
            control_plane_up=rt.control_plane_up,
        )

    def _route_listener(self, route: Route) -> Listener:
        sock = bind(route.listen_host, route.listen_port, what=f"--route {route}")
        handler = RouteHandler(self.rt, route)
        return Listener(
            sock,
            handler,
            name=f"route-{route.service}@{route.host}",
            on_refuse=refused("outbound"),
            fast=handler.fast,
        )

    def _start_transparent(self) -> None:
        # Integration point with the transparent-mode module (agent/transparent.py).
        from tapproof.agent import transparent

        cfg, rt = self.rt.config, self.rt
        # REDIRECT maps locally generated packets to 127.0.0.1: the listener never faces the network
        # (bound to 0.0.0.0 it would be a plaintext relay that lends this host's identity to anyone).
        sock = bind("127.0.0.1", cfg.transparent_port, what="--transparent-port")
        handler = TransparentHandler(rt, transparent.original_dst)
        self.transparent = Listener(sock, handler, name="transparent", on_refuse=refused("outbound"), fast=handler.fast)
        rt.mark = transparent.DEFAULT_MARK
        rt.transparent_address = self.transparent.address
        own = {parse_hostport(rt.advertise)[0]}
        cidrs = list(cfg.fleet_cidrs) + [
            f"{ip}/{32 if ':' not in ip else 128}" for ip in rt.registry.host_ips() if ip not in own
        ]
        # Inbound: connections from the network to a protected port go to the plaintext inbound listener
        # (strict refuses, permissive forwards and counts; agent/plaininbound.py). PREROUTING REDIRECT
        # rewrites the destination to the receiving interface's address, so that listener binds the
        # wildcard address; it only ever forwards what was redirected to a protected port of this host.
        protected = cfg.protected_port_set()
        clash = sorted(rt.own_ports() & set(protected))
        if clash:
            raise ConfigError(f"--protected-port: {clash} is one of the agent's own ports; it is never protected")
        inbound_port: int | None = None
        if protected:
            isock = bind("0.0.0.0", cfg.inbound_port, what="--inbound-port")  # noqa: S104 - see above
            self.plain_handler = PlainInbound(rt, protected, transparent.original_dst)
            self.plain = Listener(isock, self.plain_handler, name="plaintext-inbound", on_refuse=refused("inbound"))
            rt.inbound_address = self.plain.address
            inbound_port = parse_hostport(self.plain.address)[1]
        self.redirector = transparent.Redirector(
            transparent_port=parse_hostport(self.transparent.address)[1],
            fleet_cidrs=cidrs,
            protected_ports=protected,
            inbound_port=inbound_port,
        )
        self.redirector.install()
        self.transparent.start()
        if self.plain is not None:
            self.plain.start()

    def _write_run_file(self) -> None:
        rt = self.rt
        routes = [{"route": str(r), "listen": r.listen, "address": lst.address} for r, lst in self.routes.items()]
        data = {
            "pid": os.getpid(),
            "spiffe_id": str(rt.spiffe_id),
            "tunnel": rt.tunnel_address,
            "advertise": rt.advertise,
            "admin": rt.admin_address or None,
            "routes": {r["listen"]: r["address"] for r in reversed(routes)},
            "route_list": routes,
            "transparent": self.transparent.address if self.transparent else None,
            "inbound": self.plain.address if self.plain else None,
        }
        ensure_private_dir(self.paths.root / "run")
        write_atomic(run_file(self.paths.root), json.dumps(data, indent=2).encode(), mode=0o600)

    # --- health and status ------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(ok, reason) for ``/healthz``."""
        rt = self.rt
        now = rt.now()
        creds = rt.creds.current.creds
        if rt.stopping.is_set():
            return False, "shutting down"
        if now >= creds.not_after:
            return False, "certificate expired"
        if now < creds.not_before:
            return False, "certificate not yet valid"
        if self.tunnel is None or not self.tunnel.running:
            return False, "tunnel listener down"
        with self._lock:
            down = [str(r) for r, lst in self.routes.items() if not lst.running]
        if down:
            return False, f"route listener down: {', '.join(down)}"
        if rt.policy.policy is None:
            return False, "no policy yet (control plane never reached)"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        rt = self.rt
        m = rt.creds.current
        tunnels = rt.tunnels.live()
        pol = rt.policy.policy
        with self._lock:
            routes = {str(r): lst.address for r, lst in self.routes.items()}
        ok, reason = self.health()
        return {
            "spiffe_id": str(rt.spiffe_id),
            "healthy": ok,
            "health": reason,
            "certificate": {
                "serial": m.serial,
                "not_before": m.creds.not_before.isoformat(),
                "not_after": m.not_after.isoformat(),
                "seconds_left": int((m.not_after - rt.now()).total_seconds()),
                "generation": rt.creds.generation,
            },
            "trust_bundle": list(m.bundle.fingerprints),
            "expiries": self.sync.expiries() if self.sync is not None else [],
            "expiry_warn": rt.config.expiry_warn,
            "tunnel": rt.tunnel_address,
            "advertise": rt.advertise,
            "mode": rt.config.mode,
            "unsafe_classical_groups": rt.config.unsafe_classical_groups,
            "transparent": self.transparent.address if self.transparent else None,
            "inbound": self.plain.address if self.plain else None,
            "protected_ports": list(self.plain_handler.protected_ports) if self.plain_handler else [],
            "plaintext_inbound": self.plain_handler.status() if self.plain_handler else None,
            "routes": routes,
            "services": {s.name: s.target for s in rt.config.services},
            "tunnels": {
                "inbound": sum(1 for t in tunnels if t.direction == "inbound"),
                "outbound": sum(1 for t in tunnels if t.direction == "outbound"),
            },
            "peers": sorted({t.peer_host for t in tunnels}),
            "policy": {"version": pol.version if pol else None, "rules": len(pol.rules) if pol else 0},
            "revoked": {"serials": len(rt.policy.revoked_serials), "hosts": sorted(rt.policy.revoked_hosts)},
            "registry_hosts": sorted(rt.registry.snapshot()["hosts"]),
            "control_plane": {
                "up": rt.control_plane_up,
                "last_sync": rt.last_sync.isoformat() if rt.last_sync else None,
            },
        }

    # --- reload -----------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; apply routes, services, mode and intervals. False (old kept) if invalid."""
        try:
            new = agent_config.load(self.config_file, self.overrides)
        except ConfigError as exc:
            log_event(log, "config-reload-failed", level=logging.ERROR, detail=str(exc), kept="running config")
            return False
        old = self.rt.config
        ignored = [k for k in _RESTART_ONLY if getattr(new, k) != getattr(old, k)]
        if new.transparent and new.protected_port_set() != old.protected_port_set():
            ignored.append("service ports (protected by transparent mode)")  # the redirect rules are fixed at start
        if ignored:
            log_event(log, "config-reload-needs-restart", level=logging.WARNING, settings=ignored)
            new = _keep(new, old, _RESTART_ONLY)
        started: dict[Route, Listener] = {}
        try:
            for route in new.routes:
                if route not in self.routes:
                    started[route] = self._route_listener(route)
        except TapproofError as exc:
            for lst in started.values():
                lst.stop()
            log_event(log, "config-reload-failed", level=logging.ERROR, detail=str(exc), kept="running config")
            return False
        with self._lock:
            removed = [r for r in self.routes if r not in new.routes]
            for r in removed:
                self.routes.pop(r).stop()
            for r, lst in started.items():
                self.routes[r] = lst
                lst.start()
        self.rt.config = new
        if self.sync is not None:
            self.sync.poke(register=True)
        self._write_run_file()
        log_event(
            log,
            "config-reloaded",
            routes_added=[str(r) for r in started],
            routes_removed=[str(r) for r in removed],
            services={s.name: s.target for s in new.services},
            mode=new.mode,
        )
        return True

    # --- stop ------------------------------------------------------------------------
    def stop(self) -> int:
        """Stop accepting, drain live tunnels for up to ``drain_timeout``, abort the rest."""
        rt = self.rt
        rt.stopping.set()
        for lst in self._listeners():
            lst.stop()
        live = len(rt.tunnels.live())
        rt.tunnels.goaway_all()
        drained = rt.tunnels.wait_empty(rt.config.drain_timeout)
        aborted = 0 if drained else rt.tunnels.stop_all()
        if aborted:
            rt.tunnels.wait_empty(2.0)
        for m in rt.tunnels.muxes():  # idle pooled connections
            m.conn.stop()
        self._close_all()
        log_event(log, "agent-stopped", tunnels_at_stop=live, aborted=aborted)
        return 0

    def _listeners(self) -> list[Listener]:
        with self._lock:
            out = [*self.routes.values()]
        out.extend(lst for lst in (self.tunnel, self.transparent, self.plain) if lst is not None)
        return out

    def _close_all(self) -> None:
        self.rt.stopping.set()
        for lst in self._listeners():
            lst.stop()
        if self.redirector is not None:
            try:
                self.redirector.remove()
            except TapproofError as exc:
                log_event(log, "transparent-remove-failed", level=logging.ERROR, detail=str(exc))
        if self.admin is not None:
            self.admin.stop()
        with contextlib.suppress(OSError):
            run_file(self.paths.root).unlink()

    # --- main loop --------------------------------------------------------------------
    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads (before the address file is written: no early signal is lost)."""

        def on_stop(signum: int, _frame: object) -> None:
            log_event(log, "agent-stopping", signal=signal.Signals(signum).name)
            self._stop.set()
            self._reload.set()

        def on_hup(_signum: int, _frame: object) -> None:
            self._reload.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_stop)
            signal.signal(signal.SIGINT, on_stop)
            signal.signal(signal.SIGHUP, on_hup)

    def serve(self) -> int:
        """Block until SIGTERM/SIGINT; handle SIGHUP reloads; then stop."""
        while not self._stop.is_set():
            # Wake up now and then: the kernel may deliver SIGHUP/SIGTERM to any thread, and Python runs the
            # handler only once the main thread executes bytecode again; a wait without timeout can sleep
            # through it (seen: a SIGHUP handled only when a later SIGTERM woke the main thread).
            while not self._reload.wait(SIGNAL_POLL):
                pass
            self._reload.clear()
            if not self._stop.is_set():
                self.reload()
        return self.stop()


def _keep(new: AgentConfig, old: AgentConfig, keys: tuple[str, ...]) -> AgentConfig:
    import dataclasses

    return dataclasses.replace(new, **{k: getattr(old, k) for k in keys})


def _default_advertise(bound: str) -> str:
    """The bound tunnel address, with an unspecified host replaced by loopback."""
    host, port = parse_hostport(bound, what="--listen-tunnel", allow_zero=True)
    try:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            host = "::1" if ip.version == 6 else "127.0.0.1"
    except ValueError:
        pass
    return format_hostport(host, port)


def run(data_dir: Path, join: Callable[[], str] | None, config_file: Path | None, overrides: dict[str, Any]) -> int:
    """Enroll if needed, then run the agent until SIGTERM; return the exit code.

    ``join`` (None when no join string was given) reads the join string; it is called only when the
    data dir is not enrolled yet, so a join file that is gone after enrollment does not matter.
    """
    cfg = agent_config.load(config_file, overrides)  # check everything before enrolling
    paths = AgentPaths(Path(data_dir))
    if not paths.enrolled():
        if join is None:
            raise ConfigError(
                f"--data-dir: {paths.root} is not enrolled: "
                "give --join, --join-file or $TAPPROOF_JOIN on the first start"
            )
        enroll(paths.root, join(), max_clock_skew=dt.timedelta(seconds=cfg.max_clock_skew))
    elif join is not None:
        log_event(log, "join-ignored", reason="data dir already enrolled", data_dir=str(paths.root))
    fd_limit = raise_limits()  # 10,000 tunnels need 20,000 descriptors and 10,000 threads
    log_event(log, "process-limits", open_files=fd_limit, thread_stack=STACK_SIZE)
    agent = Agent(paths.root, cfg, config_file, overrides)
    agent.install_signals()
    agent.start()
    return agent.serve()
