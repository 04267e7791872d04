"""pyOpenSSL contexts: TLS 1.3 only, X25519MLKEM768 only, mutual authentication.

Session resumption (agent tunnels only, ``resumption=``): TLS 1.3 stateless
tickets, resumed with ``psk_dhe_ke`` ONLY (OpenSSL's default; the
``SSL_OP_ALLOW_NO_DHE_KEX`` option that would allow ``psk_ke`` is checked to be
off), so a resumed handshake still runs a fresh X25519MLKEM768 key exchange
(forward secrecy, PQ). :meth:`tapproof.tls.stream.TLSStream.require_pq` refuses
a resumed connection that allows psk_ke: after a psk_ke resumption OpenSSL
reports the original session's group, so the group check alone cannot see it.
What resumption skips is the certificate exchange and the signatures, i.e.
the ECDSA work that dominates a full handshake's CPU. A
ticket is bound to one credential generation: the session id context is a hash
of our own certificate and of the trust bundle (OpenSSL refuses a session whose
context differs), and the ticket key is created with each context, so a
renewal, a rotation or a bundle change forces full handshakes. Tickets live
:data:`TICKET_LIFETIME` seconds. The peer check (identity, expiry, revocation)
is the caller's and runs on every connection, resumed or not.

Nothing here can be made weaker by a caller: the one weakening, classical
groups after the PQ one for scanners, lives apart in :mod:`tapproof.tls.unsafe`
behind the explicit ``--unsafe-classical-groups`` flag. pyOpenSSL has no
``set_groups``, so the group list goes through its cffi binding of
``SSL_CTX_set1_curves_list``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from tapproof.errors import PKIError
from tapproof.tls.credentials import Credentials, TrustBundle

log = logging.getLogger(__name__)

PQ_GROUP = "X25519MLKEM768"
CIPHERSUITES = b"TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"

VerifyHook = Callable[[int, int, bool], None]  # (openssl errno, depth, ok) for logging

MUX_ALPN = b"tapproof-mux/1"
"""ALPN id of multiplexed agent tunnels (``tunnel.mux``); selected by agent tunnel servers when offered."""

TICKET_LIFETIME = 120
"""Seconds a TLS 1.3 session ticket may be used to resume (short: a resumption skips the chain check)."""
_OP_ALLOW_NO_DHE_KEX = 1 << 10  # SSL_OP_ALLOW_NO_DHE_KEX (OpenSSL 3.x/4.x): would permit psk_ke; must stay off


def _base(*, resumption: bool = False) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(CIPHERSUITES)
    # Free an idle connection's record buffers (~34 KiB each way): idle tunnels stay small.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if _lib.SSL_CTX_set1_curves_list(ctx._context, PQ_GROUP.encode()) != 1:
        raise PKIError(f"this OpenSSL does not support {PQ_GROUP}: install cryptography >= 50 (OpenSSL >= 3.5)")
    if not resumption:
        # No session tickets / resumption: every connection runs a full (EC)DHE+ML-KEM
        # exchange and presents certificates.
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        return ctx
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    if _lib.SSL_CTX_get_options(ctx._context) & _OP_ALLOW_NO_DHE_KEX:
        raise PKIError("this OpenSSL allows psk_ke resumption by default: refusing to enable session tickets")
    # Stateless tickets only (no server-side store); the client keeps sessions itself (tls.sessions).
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_timeout(TICKET_LIFETIME)
    return ctx


def generation_id(creds: Credentials, bundle: TrustBundle) -> bytes:
    """32 bytes naming one credential generation: our leaf and every root of the bundle.

    Used as the session id context of resumable contexts: a ticket issued under
    another certificate or another bundle does not resume.
    """
    h = hashlib.sha256(b"tapproof-session-v1\0")
    h.update(creds.leaf.fingerprint(hashes.SHA256()))
    for fp in sorted(bundle.fingerprints):
        h.update(fp.encode())
    return h.digest()


def _use_credentials(ctx: SSL.Context, creds: Credentials) -> None:
    ctx.use_certificate(creds.leaf)
    for cert in creds.chain[1:]:
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(creds.key)
    ctx.check_privatekey()


def _trust(ctx: SSL.Context, bundle: TrustBundle, *, require_peer_cert: bool, hook: VerifyHook | None) -> None:
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - pyOpenSSL always has one
        raise PKIError("no certificate store")
    for root in bundle.roots:
        store.add_cert(crypto.X509.from_cryptography(root))

    def callback(_conn: SSL.Connection, _cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if hook is not None:
            hook(errno, depth, bool(ok))
        return bool(ok)  # never overrides OpenSSL's verdict

    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require_peer_cert else 0)
    ctx.set_verify(mode, callback)
    ctx.set_verify_depth(3)


def server_context(
    creds: Credentials,
    bundle: TrustBundle,
    *,
    require_client_cert: bool = True,
    hook: VerifyHook | None = None,
    resumption: bool = False,
    mux: bool | None = None,
) -> SSL.Context:
    """A server context. With ``require_client_cert=False`` a client MAY come without a
    certificate (enrollment); one that presents a certificate must still verify.
    ``resumption=True`` issues short-lived psk_dhe_ke tickets bound to this generation
    (agent tunnels; requires a client certificate). ``mux`` (default: same as ``resumption``, i.e. agent
    tunnel contexts) selects ALPN :data:`MUX_ALPN` when a client offers it; a client that offers nothing
    gets no ALPN (one tunnel per connection). Same certificates, group and checks either way."""
    if resumption and not require_client_cert:
        raise PKIError("session resumption needs mutual authentication")
    ctx = _base(resumption=resumption)
    if resumption:
        ctx.set_session_id(generation_id(creds, bundle))
    _use_credentials(ctx, creds)
    _trust(ctx, bundle, require_peer_cert=require_client_cert, hook=hook)
    if resumption if mux is None else mux:
        ctx.set_alpn_select_callback(_select_mux)
    return ctx


def _select_mux(_conn: SSL.Connection, offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    return MUX_ALPN if MUX_ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def client_context(
    creds: Credentials | None,
    bundle: TrustBundle,
    *,
    hook: VerifyHook | None = None,
    resumption: bool = False,
) -> SSL.Context:
    """A client context that verifies the server against ``bundle`` (and presents ``creds``).
    ``resumption=True`` accepts tickets (offered only when the caller sets a session)."""
    ctx = _base(resumption=resumption)
    if creds is not None:
        _use_credentials(ctx, creds)
    _trust(ctx, bundle, require_peer_cert=True, hook=hook)
    return ctx


def pinning_client_context() -> SSL.Context:
    """A client context for enrollment bootstrap ONLY: the chain is checked after the
    handshake against the root fingerprint from the join string (see ``tls.pinning``),
    before a single byte is sent. Never use it without that check."""
    ctx = _base()

    def defer(_c: SSL.Connection, _x: crypto.X509, _e: int, _d: int, _ok: int) -> bool:
        return True  # the pinned-root check in tls.pinning.verify_pinned runs right after

    ctx.set_verify(SSL.VERIFY_PEER, defer)
    return ctx


def negotiated_group(conn: SSL.Connection) -> str:
    """The key-exchange group OpenSSL negotiated (e.g. ``X25519MLKEM768``), or ``""``."""
    ptr = _lib.SSL_get0_group_name(conn._ssl)
    if ptr == SSL._ffi.NULL:  # type: ignore[attr-defined]
        return ""
    return str(SSL._ffi.string(ptr).decode("ascii", "replace"))  # type: ignore[attr-defined]
