"""Private keys: made on the host that uses them, stored 0600, never logged."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tapproof.errors import ConfigError
from tapproof.fsutil import read_bytes, write_atomic

Algorithm = Literal["ecdsa-p256", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("ecdsa-p256", "ed25519")
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def generate(algorithm: Algorithm = "ecdsa-p256") -> PrivateKey:
    """Generate a new private key."""
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigError(f"--identity-algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")


def to_pem(key: PrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS#8 PEM (the file itself is 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def save(key: PrivateKey, path: Path) -> None:
    """Write the key atomically with mode 0600."""
    write_atomic(path, to_pem(key), mode=0o600)


def load(path: Path, *, what: str = "private key") -> PrivateKey:
    """Load a PEM private key written by :func:`save`."""
    data = read_bytes(path, what=what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {path} is not a readable PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{what}: {path} holds an unsupported key type")
    return key


def signing_hash(key: PrivateKey) -> object:
    """The hash to sign with: SHA-256 for ECDSA, None for Ed25519."""
    from cryptography.hazmat.primitives import hashes

    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
