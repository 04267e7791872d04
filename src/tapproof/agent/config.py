"""Agent run configuration: TOML file, then ``TAPPROOF_*`` environment, then flags.

One name everywhere: flag ``--listen-tunnel``, key ``listen_tunnel``, variable
``TAPPROOF_LISTEN_TUNNEL``. Repeatable settings (``service``, ``route``,
``fleet_cidr``, ``protected_port``) are TOML lists (of strings; ports may be
integers) and comma-separated in the environment; a source that sets one
replaces it wholesale (flags win).

Every rule that involves a value's syntax or several fields lives in ONE
function, :func:`check`, whose messages name the flag (ghostunnel style).
Anything that weakens the agent is spelled ``unsafe_...``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from tapproof.errors import ConfigError
from tapproof.identity import check_name
from tapproof.pki.expiry import DEFAULT as DEFAULT_EXPIRY_WARN
from tapproof.pki.expiry import parse_warn
from tapproof.units import format_hostport, parse_duration, parse_hostport

__all__ = ["AgentConfig", "Route", "Service", "check", "is_loopback", "load"]

Mode = Literal["strict", "permissive"]

DEFAULT_LISTEN_TUNNEL = "0.0.0.0:7444"
DEFAULT_ADMIN = "127.0.0.1:7445"
DEFAULT_TRANSPARENT_PORT = 7447
DEFAULT_INBOUND_PORT = 7448

_LISTS = ("service", "route", "fleet_cidr", "protected_port")
_STRINGS = (
    "listen_tunnel",
    "advertise",
    "mode",
    "admin",
    "sync_interval",
    "drain_timeout",
    "idle_timeout",
    "max_clock_skew",
    "expiry_warn",
)
_BOOLS = ("transparent", "unsafe_service_target", "unsafe_route_listen", "unsafe_classical_groups", "mux")
_NUMBERS = ("transparent_port", "inbound_port", "renew_fraction")
KEYS = _LISTS + _STRINGS + _BOOLS + _NUMBERS
"""Every key a config file, the environment or the flags may set."""


@dataclasses.dataclass(frozen=True)
class Service:
    """A local plaintext service this agent fronts: ``NAME=HOST:PORT`` or ``NAME=unix:/path``."""

    name: str
    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def target(self) -> str:
        """The target as written on the command line."""
        return f"unix:{self.unix_path}" if self.unix_path else format_hostport(self.host, self.port)


@dataclasses.dataclass(frozen=True)
class Route:
    """A local plaintext listener tunnelled to service ``service`` on host ``host``."""

    listen_host: str
    listen_port: int
    service: str
    host: str

    @property
    def listen(self) -> str:
        """``HOST:PORT`` as configured (port may be 0)."""
        return format_hostport(self.listen_host, self.listen_port)

    def __str__(self) -> str:
        return f"{self.listen}={self.service}@{self.host}"


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Everything ``tapproof agent run`` needs, already checked by :func:`check`."""

    listen_tunnel: str = DEFAULT_LISTEN_TUNNEL
    advertise: str = ""  # "" = derived from the bound tunnel address
    services: tuple[Service, ...] = ()
    routes: tuple[Route, ...] = ()
    mode: Mode = "strict"
    transparent: bool = False
    transparent_port: int = DEFAULT_TRANSPARENT_PORT
    fleet_cidrs: tuple[str, ...] = ()
    protected_ports: tuple[int, ...] = ()  # the --protected-port list only; see protected_port_set()
    inbound_port: int = DEFAULT_INBOUND_PORT
    admin: str = DEFAULT_ADMIN  # "" disables the admin endpoint
    renew_fraction: float = 0.5
    sync_interval: float = 5.0
    drain_timeout: float = 10.0
    idle_timeout: float = 3600.0
    max_clock_skew: float = 300.0  # refuse certificates when our clock is further off the server's (0: no check)
    unsafe_service_target: bool = False
    unsafe_route_listen: bool = False
    unsafe_classical_groups: bool = False  # tunnel port and API client also accept X25519/P-256 (scanners)
    mux: bool = False  # outbound: carry tunnels as streams over pooled agent-pair connections (ALPN tapproof-mux/1)
    expiry_warn: str = DEFAULT_EXPIRY_WARN  # expiry warning thresholds (tapproof.pki.expiry), as the server's

    def service(self, name: str) -> Service | None:
        """The fronted service called ``name``, if any."""
        for s in self.services:
            if s.name == name:
                return s
        return None

    def protected_port_set(self) -> tuple[int, ...]:
        """Ports whose inbound connections transparent mode redirects into the agent (sorted).

        The ``--protected-port`` list plus the port of every ``--service`` TCP target on loopback
        (a unix socket has no port; a non-loopback target, allowed by ``--unsafe-service-target``,
        is another machine's port, not one of ours).
        """
        ports = set(self.protected_ports)
        ports.update(s.port for s in self.services if not s.unix_path and is_loopback(s.host))
        return tuple(sorted(ports))


def is_loopback(host: str) -> bool:
    """True for a loopback IP literal or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_service(text: str, unsafe: bool) -> Service:
    name, eq, target = text.partition("=")
    if not eq or not target:
        raise ConfigError(f"--service: {text!r} is not NAME=HOST:PORT or NAME=unix:/PATH")
    name = check_name(name.strip(), what="--service name")
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        if not path.startswith("/"):
            raise ConfigError(f"--service: {text!r}: a unix socket path must be absolute")
        return Service(name, unix_path=path)
    host, port = parse_hostport(target, what=f"--service {name}")
    if not unsafe and not is_loopback(host):
        raise ConfigError(
            f"--service: {name} targets {target}, which is not loopback: plaintext would cross the network; "
            "use a loopback address or a unix socket, or accept the risk with --unsafe-service-target"
        )
    return Service(name, host=host, port=port)


def _parse_route(text: str, unsafe_listen: bool) -> Route:
    listen, eq, dest = text.rpartition("=")
    name, at, host = dest.partition("@")
    if not eq or not at or not listen:
        raise ConfigError(f"--route: {text!r} is not LISTEN_HOST:PORT=NAME@HOST")
    lhost, lport = parse_hostport(listen, what="--route listen address", allow_zero=True)
    if not unsafe_listen and not is_loopback(lhost):
        raise ConfigError(
            f"--route: {text!r} listens on {lhost}, not loopback: anyone who can reach it would use this "
            "host's identity; listen on loopback, or accept the risk with --unsafe-route-listen"
        )
    return Route(lhost, lport, check_name(name, what="--route service"), check_name(host, what="--route host"))


def _port(value: Any, what: str, *, allow_zero: bool) -> int:
    """A TCP port from an int or a decimal string; ConfigError naming ``what`` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a port number")
    try:
        port = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {value!r} is not a port number") from exc
    low = 0 if allow_zero else 1
    if not low <= port < 65536:
        raise ConfigError(f"{what}: {port} is not a port number ({low}-65535)")
    return port


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        secs = float(value)
    else:
        secs = parse_duration(str(value), what=what).total_seconds()
    if secs <= 0:
        raise ConfigError(f"{what}: must be positive")
    return secs


def check(raw: dict[str, Any], *, is_root: bool | None = None) -> AgentConfig:
    """Check every value and every cross-field rule; return the config or raise ConfigError.

    ``raw`` maps keys of :data:`KEYS` to values as read (strings, lists,
    bools, numbers); missing keys take their defaults.
    """
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")

    def text(key: str, default: str) -> str:
        v = raw.get(key, default)
        if not isinstance(v, str):
            raise ConfigError(f"--{key.replace('_', '-')}: expected a string")
        return v.strip()

    def strings(key: str) -> list[str]:
        v = raw.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"--{key.replace('_', '-')}: expected a list of strings")
        return [x.strip() for x in v if x.strip()]

    def flag(key: str) -> bool:
        v = raw.get(key, False)
        if isinstance(v, str):
            if v.lower() not in ("1", "0", "true", "false", "yes", "no", ""):
                raise ConfigError(f"--{key.replace('_', '-')}: {v!r} is not true or false")
            return v.lower() in ("1", "true", "yes")
        if not isinstance(v, bool):  # a number or a list must never switch an unsafe flag on
            raise ConfigError(f"--{key.replace('_', '-')}: {v!r} is not true or false")
        return v

    unsafe_target = flag("unsafe_service_target")
    unsafe_listen = flag("unsafe_route_listen")

    listen_tunnel = text("listen_tunnel", DEFAULT_LISTEN_TUNNEL)
    thost, tport = parse_hostport(listen_tunnel, what="--listen-tunnel", allow_zero=True)
    advertise = text("advertise", "")
    if advertise:
        ahost, _ = parse_hostport(advertise, what="--advertise")
        try:
            if ipaddress.ip_address(ahost).is_unspecified:
                raise ConfigError(f"--advertise: {advertise} is not an address peers can dial")
        except ValueError:
            pass  # a DNS name

    services = tuple(_parse_service(s, unsafe_target) for s in strings("service"))
    names = [s.name for s in services]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--service: {', '.join(dup)} given more than once")

    routes = tuple(_parse_route(r, unsafe_listen) for r in strings("route"))
    listens = [r.listen for r in routes if r.listen_port != 0]
    dup = sorted({a for a in listens if listens.count(a) > 1})
    if dup:
        raise ConfigError(f"--route: listen address {', '.join(dup)} used by more than one route")

    mode = text("mode", "strict")
    if mode not in ("strict", "permissive"):
        raise ConfigError(f"--mode: {mode!r} is not strict or permissive")

    transparent = flag("transparent")
    tp = raw.get("transparent_port", DEFAULT_TRANSPARENT_PORT)
    try:
        transparent_port = int(tp)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--transparent-port: {tp!r} is not a port number") from exc
    if not 0 <= transparent_port < 65536:
        raise ConfigError(f"--transparent-port: {transparent_port} is not a port number (0-65535)")
    ip = raw.get("inbound_port", DEFAULT_INBOUND_PORT)
    inbound_port = _port(ip, "--inbound-port", allow_zero=True)
    pp = raw.get("protected_port", [])
    if not isinstance(pp, list | tuple):
        pp = [pp]
    protected = []
    for v in pp:
        if isinstance(v, str) and not v.strip():
            continue
        port = _port(v, "--protected-port", allow_zero=False)
        if port not in protected:
            protected.append(port)
    cidrs = []
    for c in strings("fleet_cidr"):
        try:
            cidrs.append(str(ipaddress.ip_network(c, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"--fleet-cidr: {c!r} is not a CIDR like 10.0.0.0/8") from exc
    if cidrs and not transparent:
        raise ConfigError("--fleet-cidr: only meaningful with --transparent")
    if protected and not transparent:
        raise ConfigError("--protected-port: only meaningful with --transparent")
    if transparent:
        if not sys.platform.startswith("linux"):
            raise ConfigError("--transparent: needs Linux (iptables/nftables and SO_ORIGINAL_DST)")
        root = os.geteuid() == 0 if is_root is None else is_root
        if not root:
            raise ConfigError("--transparent: needs root to install redirect rules")
        if transparent_port == tport and transparent_port != 0:
            raise ConfigError("--transparent-port: must differ from the --listen-tunnel port")
        if inbound_port != 0 and inbound_port in (tport, transparent_port):
            raise ConfigError("--inbound-port: must differ from the --listen-tunnel and --transparent-port ports")

    admin = text("admin", DEFAULT_ADMIN)
    if admin:
        _ahost, aport = parse_hostport(admin, what="--admin", allow_zero=True)
        if aport != 0 and aport == tport:
            raise ConfigError("--admin: must not use the --listen-tunnel port")
        if aport != 0 and aport in {r.listen_port for r in routes}:
            raise ConfigError("--admin: must not use a --route listen port")
        if transparent and aport != 0 and aport == inbound_port:
            raise ConfigError("--admin: must not use the --inbound-port port")
    if tport != 0 and tport in {r.listen_port for r in routes}:
        raise ConfigError("--route: must not listen on the --listen-tunnel port")

    if transparent:
        _check_protected(protected, services, tport, transparent_port, inbound_port, admin)

    rf = raw.get("renew_fraction", 0.5)
    try:
        renew_fraction = float(rf)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--renew-fraction: {rf!r} is not a number") from exc
    if not 0.1 <= renew_fraction <= 0.9:
        raise ConfigError("--renew-fraction: must be between 0.1 and 0.9 of the certificate lifetime")

    sync_interval = _seconds(raw.get("sync_interval", 5.0), "--sync-interval")
    if not 0.2 <= sync_interval <= 3600:
        raise ConfigError("--sync-interval: must be between 200ms and 1h")
    drain_timeout = _seconds(raw.get("drain_timeout", 10.0), "--drain-timeout")
    idle_timeout = _seconds(raw.get("idle_timeout", 3600.0), "--idle-timeout")
    skew = raw.get("max_clock_skew", 300.0)
    max_clock_skew = 0.0 if str(skew).strip() in ("0", "0s", "0.0") else _seconds(skew, "--max-clock-skew")
    expiry_warn = text("expiry_warn", DEFAULT_EXPIRY_WARN)
    parse_warn(expiry_warn, what="--expiry-warn")

    return AgentConfig(
        listen_tunnel=format_hostport(thost, tport),
        advertise=advertise,
        services=services,
        routes=routes,
        mode=mode,  # type: ignore[arg-type]  # checked above
        transparent=transparent,
        transparent_port=transparent_port,
        fleet_cidrs=tuple(cidrs),
        protected_ports=tuple(protected),
        inbound_port=inbound_port,
        admin=admin,
        renew_fraction=renew_fraction,
        sync_interval=sync_interval,
        drain_timeout=drain_timeout,
        idle_timeout=idle_timeout,
        max_clock_skew=max_clock_skew,
        unsafe_service_target=unsafe_target,
        unsafe_route_listen=unsafe_listen,
        unsafe_classical_groups=flag("unsafe_classical_groups"),
        mux=flag("mux"),
        expiry_warn=expiry_warn,
    )


def _check_protected(
    protected: list[int],
    services: tuple[Service, ...],
    tunnel_port: int,
    transparent_port: int,
    inbound_port: int,
    admin: str,
) -> None:
    """No protected port (flag or service port) may be one of the agent's own ports.

    Redirecting the tunnel port would send peers' TLS into the plaintext inbound
    listener (every tunnel refused in strict mode); redirecting the inbound or
    transparent port would loop the agent into itself.
    """
    own = {tunnel_port: "--listen-tunnel", transparent_port: "--transparent-port", inbound_port: "--inbound-port"}
    if admin:
        own.setdefault(parse_hostport(admin, what="--admin", allow_zero=True)[1], "--admin")
    own.pop(0, None)
    for p in protected:
        if p in own:
            raise ConfigError(f"--protected-port: {p} is the {own[p]} port; the agent's own ports are never protected")
    for s in services:
        if not s.unix_path and is_loopback(s.host) and s.port in own:
            raise ConfigError(
                f"--service: {s.name} uses port {s.port}, the {own[s.port]} port; in --transparent mode a "
                "service's port is protected (redirected into the agent), so it must not be one of the agent's ports"
            )


def read_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into raw settings (keys checked by :func:`check`)."""
    try:
        raw: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"--config: {path} is missing") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ConfigError(f"--config: {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return raw


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings from ``TAPPROOF_<KEY>`` variables (lists comma-separated)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key in KEYS:
        value = env.get(f"TAPPROOF_{key.upper()}")
        if value is not None:
            out[key] = [v for v in value.split(",") if v.strip()] if key in _LISTS else value
    return out


def load(config_file: Path | None, overrides: dict[str, Any], environ: dict[str, str] | None = None) -> AgentConfig:
    """File, then environment, then ``overrides`` (flags; ``None`` or ``[]`` = not given); checked."""
    raw: dict[str, Any] = read_file(config_file) if config_file is not None else {}
    raw.update(from_env(environ))
    raw.update({k: v for k, v in overrides.items() if v is not None and v != [] and v is not False})
    return check(raw)
