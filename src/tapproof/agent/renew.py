"""Renewal: a new key and certificate for the same identity, at half-life, through the server.

:meth:`Credentials.renewal_due` is the pure decision (time injected); :func:`renew` does
the call and the atomic swap on disk. A failed renewal changes nothing: the
current key and certificate stay in place and keep serving until expiry.
"""

from __future__ import annotations

import datetime as dt
import logging

from tapproof import identity
from tapproof.agent.state import AgentPaths, load_bundle, load_credentials, load_identity, save_bundle
from tapproof.control.client import APIClient
from tapproof.errors import PeerReason, PeerRejected, PKIError
from tapproof.logs import log_event
from tapproof.pki import certs, csr, keys
from tapproof.pki.verify import check_leaf
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle

log = logging.getLogger(__name__)


def client_for(paths: AgentPaths, creds: Credentials | None = None, bundle: TrustBundle | None = None) -> APIClient:
    """An API client that authenticates with the agent's current credentials."""
    ident = load_identity(paths)
    c = creds or load_credentials(paths)
    b = bundle or load_bundle(paths)
    return APIClient(ident.servers, ident.trust_domain, lambda: context.client_context(c, b))


def renew(paths: AgentPaths, now: dt.datetime, client: APIClient | None = None) -> Credentials:
    """Renew now: new key, CSR, verified answer, atomic swap. Raises and changes nothing on failure."""
    ident = load_identity(paths)
    current = load_credentials(paths)
    client = client or client_for(paths, current)
    key = keys.generate("ecdsa-p256")
    resp = client.post("/v1/renew", {"csr": csr.build(key, current.spiffe_id).decode()})
    try:
        chain = tuple(certs.load_pem_chain(str(resp["certificate"]).encode(), what="renewed certificate"))
        bundle = TrustBundle.from_pem(str(resp["bundle"]).encode())
    except (KeyError, TypeError, PKIError) as exc:
        raise PeerRejected(PeerReason.UNTRUSTED, f"server sent an unusable renewal answer: {exc}") from exc
    if chain[0].public_key() != key.public_key():
        raise PeerRejected(PeerReason.UNTRUSTED, "renewed certificate is not for our key")
    sid = check_leaf(
        chain[0],
        trust_domain=ident.trust_domain,
        now=now,
        usage="client",
        accept=lambda s: s == current.spiffe_id and s.kind is identity.Kind.HOST,
    )
    new = Credentials(key, chain)
    save_bundle(paths, bundle)
    new.save(paths.key, paths.cert)
    log_event(log, "renewed", spiffe_id=str(sid), serial=certs.serial_hex(chain[0]), not_after=new.not_after)
    return new
