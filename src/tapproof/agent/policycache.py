"""The policy and revocation lists the inbound side checks, cached on disk for server outages.

Filled by the sync loop from ``GET /v1/policy`` (with ``ETag``) and
``GET /v1/revocations``; persisted to ``A/policy.json`` so that a restart
while the control plane is down still enforces the last known policy and
revocations. Until the first policy is known the agent fails closed: every
tunnel is denied (reason ``no-policy-yet``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Literal

from tapproof.errors import ConfigError
from tapproof.fsutil import write_atomic
from tapproof.identity import SpiffeID
from tapproof.logs import log_event
from tapproof.policy import Decision, Rule, evaluate, parse_ports

log = logging.getLogger(__name__)

__all__ = ["PolicyCache", "PolicySnapshot"]


@dataclasses.dataclass(frozen=True)
class PolicySnapshot:
    """Rules, default, version and ETag of one policy answer."""

    version: str
    default: Literal["allow", "deny"]
    rules: tuple[Rule, ...]
    etag: str = ""


def parse_policy(body: Any, etag: str = "") -> PolicySnapshot:
    """Parse a ``/v1/policy`` answer; ConfigError if malformed (the old policy then stays)."""
    try:
        default = body["default"]
        if default not in ("allow", "deny"):
            raise ConfigError(f"policy: default {default!r}")
        rules = []
        for r in body["rules"]:
            action = r["action"]
            if action not in ("allow", "deny"):
                raise ConfigError(f"policy: action {action!r}")
            rules.append(
                Rule(action, str(r["source"]), str(r["service"]), parse_ports(str(r.get("ports") or "")), int(r["id"]))
            )
        return PolicySnapshot(str(body["version"]), default, tuple(rules), etag)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"policy: malformed answer ({exc})") from exc


class PolicyCache:
    """Thread-safe policy and revocations; readers take immutable snapshots."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.policy: PolicySnapshot | None = None
        self.revoked_serials: frozenset[str] = frozenset()
        self.revoked_hosts: frozenset[str] = frozenset()
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            # parse everything first: a half-read cache must not give a policy without its revocations
            policy = parse_policy(data["policy"], str(data["policy"].get("etag", "")))
            serials = frozenset(str(s).lower() for s in data["revocations"]["serials"])
            hosts = frozenset(str(h) for h in data["revocations"]["hosts"])
            self.policy, self.revoked_serials, self.revoked_hosts = policy, serials, hosts
            log_event(log, "policy-cache-loaded", version=policy.version, path=str(self.path))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            log_event(log, "policy-cache-unreadable", level=logging.WARNING, path=str(self.path), detail=str(exc))

    def _save(self) -> None:
        p = self.policy
        data = {
            "policy": None
            if p is None
            else {
                "version": p.version,
                "default": p.default,
                "etag": p.etag,
                "rules": [
                    {
                        "id": r.rule_id,
                        "action": r.action,
                        "source": r.source,
                        "service": r.service,
                        "ports": ",".join(f"{lo}-{hi}" for lo, hi in r.ports),
                    }
                    for r in p.rules
                ],
            },
            "revocations": {"serials": sorted(self.revoked_serials), "hosts": sorted(self.revoked_hosts)},
        }
        write_atomic(self.path, json.dumps(data, sort_keys=True).encode(), mode=0o600)

    def set_policy(self, snap: PolicySnapshot) -> bool:
        """Install a new policy; True if its version changed."""
        with self._lock:
            changed = self.policy is None or self.policy.version != snap.version
            self.policy = snap
            if changed:
                self._save()
        return changed

    def set_revocations(self, body: Any) -> tuple[frozenset[str], frozenset[str]]:
        """Install ``/v1/revocations``; return the serials and hosts newly revoked."""
        try:
            serials = frozenset(str(s).lower() for s in body["serials"])
            hosts = frozenset(str(h) for h in body["hosts"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"revocations: malformed answer ({exc})") from exc
        with self._lock:
            new_s, new_h = serials - self.revoked_serials, hosts - self.revoked_hosts
            changed = serials != self.revoked_serials or hosts != self.revoked_hosts
            self.revoked_serials, self.revoked_hosts = serials, hosts
            if changed:
                self._save()
        return new_s, new_h

    def decide(self, source: SpiffeID, service: str, port: int | None) -> Decision:
        """Evaluate the current policy (deny, fail closed, while none is known yet)."""
        p = self.policy
        if p is None:
            return Decision(False, "no-policy-yet")
        return evaluate(p.rules, source, service, port, default=p.default)

    def is_revoked(self, serial: str, host: str) -> bool:
        """True if the serial or the host is revoked."""
        return serial.lower() in self.revoked_serials or host in self.revoked_hosts
