"""Parsing of durations (``15m``, ``1h``, ``90s``, ``7d``) and ``HOST:PORT`` addresses."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re

from tapproof.errors import ConfigError

_DURATION = re.compile(r"^(\d{1,9})(ms|s|m|h|d)$")
_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, *, what: str = "duration") -> dt.timedelta:
    """Parse ``"15m"``-style durations; raise :class:`ConfigError` naming ``what``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a duration like 90s, 15m, 1h or 7d")
    value = int(m.group(1)) * _FACTORS[m.group(2)]
    if value <= 0:
        raise ConfigError(f"{what}: must be positive, got {text!r}")
    return dt.timedelta(seconds=value)


def format_duration(delta: dt.timedelta) -> str:
    """Format a duration compactly (``1h``, ``15m``, ``42s``, ``2d3h``)."""
    secs = int(delta.total_seconds())
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return sign + ("".join(parts[:2]) or "0s")


def parse_hostport(text: str, *, what: str = "address", allow_zero: bool = False) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``; raise :class:`ConfigError` naming ``what``.

    ``allow_zero`` admits port 0 (listen addresses: the kernel picks a free port).
    """
    text = text.strip()
    host: str
    port_s: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{what}: {text!r}: missing ']'")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what}: {text!r}: expected ':PORT' after ']'")
        port_s = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"{what}: {host!r} is not an IPv6 address") from exc
    else:
        if text.count(":") > 1:
            raise ConfigError(f"{what}: {text!r}: write IPv6 addresses as [ADDR]:PORT")
        host, _, port_s = text.partition(":")
        port_s = port_s if _ else None
    if not host:
        raise ConfigError(f"{what}: {text!r} has no host")
    if port_s is None:
        raise ConfigError(f"{what}: {text!r} has no port (HOST:PORT)")
    lowest = 0 if allow_zero else 1
    if not port_s.isdigit() or not lowest <= int(port_s) < 65536:
        raise ConfigError(f"{what}: {port_s!r} is not a port number (1-65535)")
    return host, int(port_s)


def format_hostport(host: str, port: int) -> str:
    """Format an address as ``HOST:PORT`` (``[V6]:PORT`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
