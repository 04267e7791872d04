"""Small pyOpenSSL mutual-TLS 1.3 contexts for the relay's tests and benchmark.

Not the project's TLS factory (``tapproof.tls``): just enough to get a real
mutual TLS 1.3 handshake restricted to X25519MLKEM768 with ECDSA P-256
certificates, made here with ``cryptography``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

GROUP = b"X25519MLKEM768"


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A CA certificate (PEM) and two leaves (cert, key) signed by it."""

    ca_pem: bytes
    server: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    client: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_credentials() -> Credentials:
    """A throw-away CA and a server and client leaf (ECDSA P-256)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tapproof test ca"))
        .issuer_name(_name("tapproof test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://test.example/host/{cn}")]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    from cryptography.hazmat.primitives.serialization import Encoding

    return Credentials(ca.public_bytes(Encoding.PEM), leaf("server"), leaf("client"))


def make_context(creds: Credentials, *, server: bool) -> SSL.Context:
    """A TLS 1.3-only, mutual, X25519MLKEM768-only context."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    cert, key = creds.server if server else creds.client
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        os.write(fd, creds.ca_pem)
        os.close(fd)
        ctx.load_verify_locations(path)
    finally:
        os.unlink(path)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if lib.SSL_CTX_set1_curves_list(ctx._context, GROUP) != 1:
        raise RuntimeError("X25519MLKEM768 is not available")
    return ctx


def negotiated_group(conn: SSL.Connection) -> str:
    """The key-exchange group negotiated on ``conn``."""
    name = lib.SSL_get0_group_name(conn._ssl)
    return "" if name == ffi.NULL else str(ffi.string(name).decode("ascii"))


def tls_accept(ctx: SSL.Context, sock: socket.socket) -> SSL.Connection:
    """Server handshake on an accepted (blocking) socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = SSL.Connection(ctx, sock)
    conn.set_accept_state()
    conn.do_handshake()
    return conn


def tls_connect(ctx: SSL.Context, addr: tuple[str, int]) -> SSL.Connection:
    """Connect and handshake as the client (blocking socket)."""
    sock = socket.create_connection(addr, timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    conn.do_handshake()
    return conn


def tls_pair(creds: Credentials) -> tuple[SSL.Connection, SSL.Connection]:
    """A handshaken (client, server) pair over a loopback TCP connection."""
    lsock = socket.create_server(("127.0.0.1", 0))
    out: list[SSL.Connection] = []
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            s, _ = lsock.accept()
            out.append(tls_accept(make_context(creds, server=True), s))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
            errors.append(exc)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        client = tls_connect(make_context(creds, server=False), lsock.getsockname())
        t.join(10)
    finally:
        lsock.close()
    if errors:
        raise errors[0]
    return client, out[0]
