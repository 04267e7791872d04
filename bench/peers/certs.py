"""Certificates for the TLS peers (stunnel, socat, haproxy): one CA, a server and a client, ECDSA P-256.

Made with ``cryptography`` into the benchmark's temporary directory, files 0600.
The server certificate names ``localhost`` and 127.0.0.1 so every client end
can check the host name as well as the chain.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class PeerCerts:
    """Paths of the generated PEM files (``*.pem`` = certificate followed by its key)."""

    ca: Path
    server_crt: Path
    server_key: Path
    server_pem: Path
    client_crt: Path
    client_key: Path
    client_pem: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def make(directory: Path) -> PeerCerts:
    """Write a CA, a server and a client certificate (ECDSA P-256, SHA-256) into ``directory``."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tapproof bench CA"))
        .issuer_name(_name("tapproof bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    out: dict[str, Path] = {"ca": _write(directory / "ca.pem", ca.public_bytes(pem))}
    for role, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
        if role == "server":
            sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        else:
            sans = [x509.DNSName("bench-client")]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost" if role == "server" else "bench-client"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        crt = cert.public_bytes(pem)
        k = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        out[f"{role}_crt"] = _write(directory / f"{role}.crt", crt)
        out[f"{role}_key"] = _write(directory / f"{role}.key", k)
        out[f"{role}_pem"] = _write(directory / f"{role}.pem", crt + k)
    return PeerCerts(**out)
