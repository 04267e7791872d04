"""The registry cache: where each host's agent listens, persisted so routes survive a server outage.

Filled from ``GET /v1/registry`` by the sync loop and written to
``A/registry.json`` atomically after each change; read at start, so an agent
restarted while the control plane is down still resolves its routes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from pathlib import Path
from typing import Any

from tapproof.errors import ConfigError
from tapproof.fsutil import write_atomic
from tapproof.logs import log_event
from tapproof.units import parse_hostport

log = logging.getLogger(__name__)

__all__ = ["RegistryCache"]


class RegistryCache:
    """Thread-safe view of the control plane's registry (hosts and services)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"hosts": {}, "services": []}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self._data = self._validated(data)
        except FileNotFoundError:
            return
        except (OSError, ValueError, ConfigError) as exc:
            log_event(log, "registry-cache-unreadable", level=logging.WARNING, path=str(self.path), detail=str(exc))

    @staticmethod
    def _validated(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("hosts"), dict):
            raise ConfigError("registry: expected {hosts: {...}, services: [...]}")
        hosts: dict[str, dict[str, Any]] = {}
        for name, h in data["hosts"].items():
            if isinstance(h, dict):
                hosts[str(name)] = {"advertise": str(h.get("advertise") or ""), "revoked": bool(h.get("revoked"))}
        services = [s for s in data.get("services") or [] if isinstance(s, dict)]
        return {"hosts": hosts, "services": services}

    def update(self, data: Any) -> bool:
        """Replace the cache with a fresh registry answer; persist it. True if it changed."""
        fresh = self._validated(data)
        with self._lock:
            if fresh == self._data:
                return False
            self._data = fresh
        write_atomic(self.path, json.dumps(fresh, sort_keys=True).encode(), mode=0o600)
        return True

    def advertise(self, host: str) -> tuple[str, int] | None:
        """The tunnel address host ``host`` registered, or None (unknown, revoked or unregistered)."""
        with self._lock:
            h = self._data["hosts"].get(host)
        if not h or h["revoked"] or not h["advertise"]:
            return None
        try:
            return parse_hostport(h["advertise"], what="registry advertise")
        except ConfigError:
            return None

    def host_for_ip(self, ip: str) -> str | None:
        """The (non-revoked) host whose advertised tunnel IP is ``ip`` (transparent mode)."""
        try:
            want = ipaddress.ip_address(ip)
        except ValueError:
            return None
        with self._lock:
            hosts = dict(self._data["hosts"])
        for name, h in sorted(hosts.items()):
            if h["revoked"] or not h["advertise"]:
                continue
            try:
                addr, _port = parse_hostport(h["advertise"], what="registry advertise")
                if ipaddress.ip_address(addr) == want:
                    return str(name)
            except (ConfigError, ValueError):
                continue
        return None

    def host_ips(self) -> list[str]:
        """Advertised IP addresses of every non-revoked host (transparent-mode redirect targets)."""
        out = []
        with self._lock:
            hosts = list(self._data["hosts"].values())
        for h in hosts:
            if h["revoked"] or not h["advertise"]:
                continue
            try:
                addr, _ = parse_hostport(h["advertise"], what="registry advertise")
                out.append(str(ipaddress.ip_address(addr)))
            except (ConfigError, ValueError):
                continue
        return sorted(set(out))

    def snapshot(self) -> dict[str, Any]:
        """A copy of the cached registry (for /status)."""
        with self._lock:
            return json.loads(json.dumps(self._data))  # type: ignore[no-any-return]
