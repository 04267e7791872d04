"""Credentials (a key and its certificate chain) and the trust bundle, as loaded from disk."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from cryptography import x509

from tapproof.errors import ConfigError, PKIError
from tapproof.fsutil import read_bytes, write_atomic
from tapproof.identity import SpiffeID
from tapproof.pki import certs, keys
from tapproof.pki.verify import spiffe_id_of


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A private key with its chain (leaf first, then intermediates)."""

    key: keys.PrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        """The end-entity certificate."""
        return self.chain[0]

    @property
    def spiffe_id(self) -> SpiffeID:
        """The identity in the leaf's URI SAN."""
        return spiffe_id_of(self.leaf)

    @property
    def not_after(self) -> dt.datetime:
        """When the leaf expires."""
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        """When the leaf became valid (backdated by ``certs.BACKDATE`` at issuance)."""
        return self.leaf.not_valid_before_utc

    @property
    def issued_at(self) -> dt.datetime:
        """When the leaf was issued: ``not_before`` without the clock-skew backdate."""
        if self.not_after - self.not_before > certs.BACKDATE:
            return self.not_before + certs.BACKDATE
        return self.not_before

    @property
    def lifetime(self) -> dt.timedelta:
        """The lifetime the issuer granted (without the backdate)."""
        return self.not_after - self.issued_at

    def renewal_due(self, now: dt.datetime, fraction: float = 0.5) -> bool:
        """True once ``fraction`` of the granted lifetime has passed, counted from issuance.

        Counting from the backdated ``not_before`` would make a 1-minute
        certificate (6 minutes with the backdate) due at once, and again after
        every renewal.
        """
        return now >= self.issued_at + self.lifetime * fraction

    def save(self, key_path: Path, cert_path: Path) -> None:
        """Write key (0600) then chain, each atomically.

        The certificate is written last: a crash in between leaves a new key
        with the old certificate, which :func:`load` detects (mismatch) so the
        caller can fall back to renewing instead of serving a broken pair.
        """
        keys.save(self.key, key_path)
        write_atomic(cert_path, certs.to_pem(self.chain), mode=0o644)

    @classmethod
    def load(cls, key_path: Path, cert_path: Path) -> Credentials:
        """Load and check that the key matches the leaf."""
        key = keys.load(key_path)
        try:
            chain = tuple(certs.load_pem_chain(read_bytes(cert_path, what="certificate"), what=str(cert_path)))
        except PKIError as exc:
            raise ConfigError(str(exc)) from exc
        if chain[0].public_key() != key.public_key():
            raise ConfigError(f"{cert_path} does not match the key in {key_path}")
        return cls(key, chain)


@dataclasses.dataclass(frozen=True)
class TrustBundle:
    """The root certificates a peer chain must end at (several during a root rotation)."""

    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.roots:
            raise PKIError("trust bundle is empty")

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """SHA-256 fingerprints of the roots."""
        return tuple(certs.fingerprint(r) for r in self.roots)

    def to_pem(self) -> bytes:
        """All roots as PEM."""
        return certs.to_pem(self.roots)

    @classmethod
    def from_pem(cls, data: bytes, *, what: str = "trust bundle") -> TrustBundle:
        """Parse a PEM bundle; every certificate must be a CA."""
        roots = certs.load_pem_chain(data, what=what)
        for r in roots:
            try:
                bc = r.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound as exc:
                raise PKIError(f"{what}: a certificate without basicConstraints is not a root") from exc
            if not bc.ca:
                raise PKIError(f"{what}: a non-CA certificate is not a root")
        return cls(tuple(roots))
