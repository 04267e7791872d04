"""Expiry of every certificate that matters (leaf, intermediates, roots) and when to warn (pure).

One setting, one name everywhere: flag ``--expiry-warn``, key ``expiry_warn``,
variable ``TAPPROOF_EXPIRY_WARN``. Its value is a comma list of thresholds,
each a share of the certificate's lifetime left (``25%``) or a time left
(``30d``), optionally for one kind only (``root=365d``). Default ``25%``:
warn once less than a quarter of a certificate's lifetime is left.
Example: ``25%,root=365d,intermediate=30d``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tapproof.errors import ConfigError
from tapproof.pki import certs
from tapproof.units import parse_duration

Kind = Literal["leaf", "intermediate", "root"]
KINDS: tuple[Kind, ...] = ("leaf", "intermediate", "root")
DEFAULT = "25%"


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Warn when less than ``share`` of the lifetime, or less than ``left``, remains."""

    share: float | None = None
    left: dt.timedelta | None = None

    def reached(self, not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> bool:
        """True once the threshold is crossed (always true for an expired certificate)."""
        remaining = not_after - now
        if remaining <= dt.timedelta(0):
            return True
        if self.left is not None:
            return remaining < self.left
        lifetime = max(not_after - not_before, dt.timedelta(seconds=1))
        return remaining < lifetime * (self.share or 0.0)


@dataclasses.dataclass(frozen=True)
class WarnPolicy:
    """Thresholds per kind (``default`` for the kinds not named)."""

    default: Threshold
    per_kind: Mapping[str, Threshold] = dataclasses.field(default_factory=dict)

    def for_kind(self, kind: Kind) -> Threshold:
        """The threshold for ``kind``."""
        return self.per_kind.get(kind, self.default)


def _threshold(text: str, what: str) -> Threshold:
    text = text.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError as exc:
            raise ConfigError(f"{what}: {text!r} is not a percentage like 25%") from exc
        if not 0 < pct < 100:
            raise ConfigError(f"{what}: {text!r} must be between 0% and 100%")
        return Threshold(share=pct / 100)
    return Threshold(left=parse_duration(text, what=what))


def parse_warn(text: str, *, what: str = "--expiry-warn") -> WarnPolicy:
    """Parse ``25%,root=365d``; raise :class:`ConfigError` naming ``what``."""
    default = Threshold(share=0.25)
    per: dict[str, Threshold] = {}
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{what}: empty; give e.g. 25% or 25%,root=365d")
    for part in parts:
        if "=" in part:
            kind, _, value = part.partition("=")
            kind = kind.strip()
            if kind not in KINDS:
                raise ConfigError(f"{what}: unknown kind {kind!r} (leaf, intermediate, root)")
            per[kind] = _threshold(value, what)
        else:
            default = _threshold(part, what)
    return WarnPolicy(default, per)


@dataclasses.dataclass(frozen=True)
class Expiry:
    """One certificate's validity as seen at ``now``."""

    kind: Kind
    name: str  # serial for leaves, fingerprint (16 hex) for CAs
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    def seconds_left(self, now: dt.datetime) -> int:
        """Seconds until expiry (negative once expired)."""
        return int((self.not_after - now).total_seconds())

    def to_json(self, now: dt.datetime, policy: WarnPolicy) -> dict[str, object]:
        """The status-document form."""
        return {
            "kind": self.kind,
            "name": self.name,
            "subject": self.subject,
            "not_after": self.not_after.isoformat(),
            "seconds_left": self.seconds_left(now),
            "warn": policy.for_kind(self.kind).reached(self.not_before, self.not_after, now),
        }


def of_cert(kind: Kind, cert: x509.Certificate) -> Expiry:
    """The expiry of one certificate."""
    name = certs.serial_hex(cert) if kind == "leaf" else certs.fingerprint(cert)[:16]
    return Expiry(kind, name, cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc)


def of_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> list[Expiry]:
    """Leaf, every CA certificate in the chain that is not a root, then every root of the bundle."""
    out = [of_cert("leaf", chain[0])]
    root_fps = {certs.fingerprint(r) for r in roots}
    out += [of_cert("intermediate", c) for c in chain[1:] if certs.fingerprint(c) not in root_fps]
    out += [of_cert("root", r) for r in roots]
    return out


def warnings(items: Sequence[Expiry], now: dt.datetime, policy: WarnPolicy) -> list[Expiry]:
    """The items whose threshold is crossed."""
    return [e for e in items if policy.for_kind(e.kind).reached(e.not_before, e.not_after, now)]


def chain_root(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> str | None:
    """Fingerprint of the root of ``roots`` that signed the last certificate of ``chain`` (None: none did)."""
    top = chain[-1]
    for root in roots:
        if certs.fingerprint(root) == certs.fingerprint(top):
            return certs.fingerprint(root)
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return certs.fingerprint(root)
    return None
