"""The control plane's CA in its data dir: ``D/ca/{root,intermediate}.{key,crt}``.

The root signs only intermediates; the intermediate signs every leaf. Keys
are files with mode 0600 made where they are used.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from tapproof.errors import ConfigError, PKIError
from tapproof.fsutil import ensure_private_dir, read_bytes, write_atomic
from tapproof.identity import SpiffeID, check_trust_domain
from tapproof.pki import certs, keys
from tapproof.tls.credentials import Credentials, TrustBundle

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=90)


@dataclasses.dataclass(frozen=True)
class CAPaths:
    """Where the CA files live inside a server data dir."""

    root: Path

    @property
    def dir(self) -> Path:
        """``D/ca``."""
        return self.root / "ca"

    @property
    def root_key(self) -> Path:
        """Root private key (0600)."""
        return self.dir / "root.key"

    @property
    def root_cert(self) -> Path:
        """Root certificate."""
        return self.dir / "root.crt"

    @property
    def int_key(self) -> Path:
        """Intermediate private key (0600)."""
        return self.dir / "intermediate.key"

    @property
    def int_cert(self) -> Path:
        """Intermediate certificate."""
        return self.dir / "intermediate.crt"


@dataclasses.dataclass(frozen=True)
class LocalCA:
    """An intermediate CA that can issue leaves, with the root it chains to."""

    trust_domain: str
    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: keys.PrivateKey

    @property
    def bundle(self) -> TrustBundle:
        """The trust bundle with this CA's root."""
        return TrustBundle((self.root,))

    @property
    def root_fingerprint(self) -> str:
        """SHA-256 fingerprint of the root (what join strings pin)."""
        return certs.fingerprint(self.root)

    def issue(
        self, public_key: certs.PublicKey, spiffe_id: SpiffeID, now: dt.datetime, lifetime: dt.timedelta
    ) -> tuple[x509.Certificate, ...]:
        """Sign a leaf for ``spiffe_id``; return the chain (leaf, intermediate)."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise PKIError(f"{spiffe_id} is outside trust domain {self.trust_domain}")
        leaf = certs.make_leaf(public_key, spiffe_id, self.intermediate_key, self.intermediate, now, lifetime)
        return (leaf, self.intermediate)

    def credentials_for(self, spiffe_id: SpiffeID, now: dt.datetime, lifetime: dt.timedelta) -> Credentials:
        """Make a key here and issue for it (the server's own and the admin's credentials)."""
        key = keys.generate("ecdsa-p256")
        return Credentials(key, self.issue(key.public_key(), spiffe_id, now, lifetime))


def init_ca(data_dir: Path, trust_domain: str, now: dt.datetime, algorithm: keys.Algorithm = "ecdsa-p256") -> LocalCA:
    """Create root and intermediate in ``data_dir``; refuse to overwrite an existing CA."""
    check_trust_domain(trust_domain)
    return create_ca(
        data_dir,
        trust_domain,
        now,
        algorithm,
        lambda int_key, root, root_key: certs.make_intermediate(
            int_key, root_key, root, trust_domain, "1", now, INTERMEDIATE_LIFETIME
        ),
    )


IssueIntermediate = Callable[[keys.PrivateKey, x509.Certificate, keys.PrivateKey], x509.Certificate]
"""Certifies a new intermediate key: ``(intermediate_key, root, root_key) -> intermediate``."""


def create_ca(
    data_dir: Path, trust_domain: str, now: dt.datetime, algorithm: keys.Algorithm, issue: IssueIntermediate
) -> LocalCA:
    """A new root and intermediate (certified by ``issue``) written to ``data_dir``; never over an existing CA."""
    paths = CAPaths(Path(data_dir))
    if any(p.exists() for p in (paths.root_key, paths.root_cert, paths.int_key, paths.int_cert)):
        raise ConfigError(f"--data-dir: {paths.dir} already holds a CA; refusing to overwrite it")
    ensure_private_dir(paths.dir)
    root_key = keys.generate(algorithm)
    root = certs.make_root(root_key, trust_domain, now, ROOT_LIFETIME)
    int_key = keys.generate(algorithm)
    inter = issue(int_key, root, root_key)
    keys.save(root_key, paths.root_key)
    keys.save(int_key, paths.int_key)
    write_atomic(paths.int_cert, certs.to_pem(inter))
    write_atomic(paths.root_cert, certs.to_pem(root))  # last: its presence marks a complete CA
    return LocalCA(trust_domain, root, inter, int_key)


def load_ca(data_dir: Path, trust_domain: str) -> LocalCA:
    """Load the CA from ``data_dir``, with clear errors for a missing or corrupt one."""
    paths = CAPaths(Path(data_dir))
    if not paths.root_cert.exists():
        raise ConfigError(f"--data-dir: no CA in {paths.dir}: run `tapproof server init` first")
    try:
        root = certs.load_pem_chain(read_bytes(paths.root_cert, what="root certificate"))[0]
        inter = certs.load_pem_chain(read_bytes(paths.int_cert, what="intermediate certificate"))[0]
    except PKIError as exc:
        raise ConfigError(f"--data-dir: corrupt CA in {paths.dir}: {exc}") from exc
    int_key = keys.load(paths.int_key, what="intermediate key")
    if int_key.public_key() != inter.public_key():
        raise ConfigError(f"--data-dir: {paths.int_key} does not match {paths.int_cert}")
    return LocalCA(trust_domain, root, inter, int_key)
