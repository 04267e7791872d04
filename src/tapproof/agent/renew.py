"""Renewal: a new key and certificate for the same identity, at half-life, through the server.

:meth:`Credentials.renewal_due` is the pure decision (time injected); :func:`renew` does
the call and the atomic swap on disk. A failed renewal changes nothing: the
current key and certificate stay in place and keep serving until expiry.
"""

from __future__ import annotations

import datetime as dt
import logging

from tapproof import identity
from tapproof.agent import clockskew
from tapproof.agent.state import (
    AgentPaths,
    load_bundle,
    load_credentials,
    load_identity,
    save_bundle,
    save_credentials,
)
from tapproof.control.client import APIClient
from tapproof.errors import PeerReason, PeerRejected, PKIError, TapproofError
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


def renew(
    paths: AgentPaths,
    now: dt.datetime,
    client: APIClient | None = None,
    *,
    max_clock_skew: dt.timedelta = clockskew.DEFAULT_MAX_SKEW,
) -> Credentials:
    """Renew now: new key, CSR, verified answer, atomic swap. Raises and changes nothing on failure.

    The current certificate may have expired: the server accepts it for renewal
    within its grace (``--renew-grace``) if it is the host's latest and unrevoked.
    A clock further than ``max_clock_skew`` from the server's refuses the answer
    (:class:`ClockSkewError`, logged and counted).
    """
    ident = load_identity(paths)
    current = load_credentials(paths)
    client = client or client_for(paths, current)
    key = keys.generate("ecdsa-p256")
    sent = dt.datetime.now(dt.UTC)
    try:
        _status, headers, resp = client.call("POST", "/v1/renew", {"csr": csr.build(key, current.spiffe_id).decode()})
    except PeerRejected as exc:  # the server's certificate: maybe only our clock is wrong
        _skew_or(exc, client, sent, max_clock_skew)
        raise
    received = dt.datetime.now(dt.UTC)
    try:
        chain = tuple(certs.load_pem_chain(str(resp["certificate"]).encode(), what="renewed certificate"))
        bundle = TrustBundle.from_pem(str(resp["bundle"]).encode())
    except (KeyError, TypeError, PKIError) as exc:
        raise PeerRejected(PeerReason.UNTRUSTED, f"server sent an unusable renewal answer: {exc}") from exc
    clockskew.enforce(
        clockskew.measure(sent, received, headers.get("date"), chain[0].not_valid_before_utc),
        max_clock_skew,
        at="renewal",
    )
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
    save_credentials(paths, new)  # one pair, one atomic switch (a full disk keeps the old pair)
    log_event(log, "renewed", spiffe_id=str(sid), serial=certs.serial_hex(chain[0]), not_after=new.not_after)
    return new


def _skew_or(exc: PeerRejected, client: APIClient, sent: dt.datetime, limit: dt.timedelta) -> None:
    """After the server's certificate was refused: raise :class:`ClockSkewError` if our clock is the cause."""
    try:
        date = client.server_date()
    except TapproofError:
        return  # not a clock problem we can show: the caller raises ``exc``
    clockskew.enforce(clockskew.measure(sent, dt.datetime.now(dt.UTC), date), limit, at="renewal")
