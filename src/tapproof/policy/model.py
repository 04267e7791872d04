"""Policy rules and their evaluation (a pure function).

A rule: ``allow|deny SOURCE -> SERVICE [ports]``.

* ``SOURCE`` is a SPIFFE ID pattern; ``*`` matches within one path segment,
  ``**`` or a lone ``*`` matches anything. Short forms: ``host/web-*`` means
  ``spiffe://TD/host/web-*``; ``*`` means every identity of the trust domain.
* ``SERVICE`` is a service-name pattern (``redis``, ``db-*``, ``*``).
* ``ports``: ``""`` (any), or ``6379`` / ``7000-7010`` / comma lists. A rule
  with ports is only about transparent-mode connections (``CONNECT ip:port``);
  it never matches a route's connection to a service by name.

Evaluation, in this order (after Istio's authorization model):

1. any matching ``deny`` rule denies;
2. if any ``allow`` rule is about this service (service and port match), the
   source must match one of them, or it is denied;
3. otherwise the default decides: ``allow`` unless the server setting
   ``default_policy = deny``.

So ``allow host/web-* -> redis`` alone lets web hosts reach redis and locks
every other host out of redis, while other services stay open by default.
Identities of other trust domains never get this far: TLS refuses them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

from tapproof.errors import ConfigError
from tapproof.identity import SpiffeID

Action = Literal["allow", "deny"]
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9._\-*/:]+$")
_SERVICE_PATTERN = re.compile(r"^[a-z0-9._\-*]{1,64}$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule (``rule_id`` 0 until stored)."""

    action: Action
    source: str
    service: str
    ports: tuple[tuple[int, int], ...] = ()
    rule_id: int = 0

    def matches_target(self, service: str, port: int | None) -> bool:
        """True if the rule is about ``service`` (and ``port``)."""
        if not _glob(self.service, service, segmented=False):
            return False
        if self.ports:  # a port-scoped rule is only about connections that target a port
            return port is not None and any(lo <= port <= hi for lo, hi in self.ports)
        return True

    def matches_source(self, source: SpiffeID) -> bool:
        """True if ``source`` matches the rule's source pattern."""
        return _glob(self.source, str(source), segmented=True)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The result of :func:`evaluate`: allowed or not, and why (for logs)."""

    allowed: bool
    reason: str
    rule_id: int | None = None


def evaluate(
    rules: Sequence[Rule],
    source: SpiffeID,
    service: str,
    port: int | None = None,
    *,
    default: Action = "allow",
) -> Decision:
    """Decide whether ``source`` may reach ``service`` (on ``port``)."""
    relevant = [r for r in rules if r.matches_target(service, port)]
    for r in relevant:
        if r.action == "deny" and r.matches_source(source):
            return Decision(False, f"denied by rule {r.rule_id}", r.rule_id)
    allows = [r for r in relevant if r.action == "allow"]
    for r in allows:
        if r.matches_source(source):
            return Decision(True, f"allowed by rule {r.rule_id}", r.rule_id)
    if allows:
        return Decision(False, f"no allow rule for this source (service {service} has allow rules)")
    return Decision(default == "allow", f"default policy {default}")


def _glob(pattern: str, text: str, *, segmented: bool) -> bool:
    if pattern in ("*", "**"):
        return True
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*" if segmented else ".*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.fullmatch("".join(out), text) is not None


def parse_source(pattern: str, trust_domain: str) -> str:
    """Normalise a user's source pattern to a full ``spiffe://TD/...`` pattern."""
    p = pattern.strip()
    if p in ("*", "**"):
        return f"spiffe://{trust_domain}/**"
    if not p or not _PATTERN_CHARS.match(p) or ".." in p:
        raise ConfigError(f"--from: {pattern!r} is not an identity pattern (e.g. host/web-* or spiffe://TD/host/a)")
    if p.startswith("spiffe://"):
        td = p[len("spiffe://") :].split("/", 1)[0]
        if td != trust_domain:
            raise ConfigError(f"--from: {pattern!r} is outside trust domain {trust_domain}")
        return p
    if p.startswith("/") or "://" in p:
        raise ConfigError(f"--from: {pattern!r}: write host/NAME, svc/NAME or spiffe://{trust_domain}/...")
    return f"spiffe://{trust_domain}/{p}"


def parse_service(pattern: str) -> str:
    """Validate a service pattern."""
    p = pattern.strip()
    if not _SERVICE_PATTERN.match(p):
        raise ConfigError(f"--to: {pattern!r} is not a service name or pattern (e.g. redis, db-*, *)")
    return p


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    """Parse ``""``, ``"6379"``, ``"7000-7010,8080"`` into ranges."""
    text = text.strip()
    if not text:
        return ()
    out = []
    for part in text.split(","):
        lo_s, _, hi_s = part.strip().partition("-")
        hi_s = hi_s or lo_s
        if not (lo_s.isdigit() and hi_s.isdigit()):
            raise ConfigError(f"--ports: {part!r} is not a port or range")
        lo, hi = int(lo_s), int(hi_s)
        if not (0 < lo <= hi < 65536):
            raise ConfigError(f"--ports: {part!r} is out of 1-65535 or reversed")
        out.append((lo, hi))
    return tuple(out)


def format_ports(ports: tuple[tuple[int, int], ...]) -> str:
    """Inverse of :func:`parse_ports`."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
