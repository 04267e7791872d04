"""The control plane's logic: tokens, enrollment, renewal, registry, policy, revocation, status.

Takes a Store, a LocalCA and a Clock; no sockets (the HTTP shell is in
``control.httpserver``, routing in ``control.api``). Every admin action and
every issuance lands in the append-only audit log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
from typing import Any

from prometheus_client import Counter

from tapproof import identity
from tapproof.clock import Clock
from tapproof.control.config import ServerConfig
from tapproof.control.joinstring import JoinString, hash_secret, new_secret
from tapproof.errors import (
    ConfigError,
    CSRReason,
    CSRRejected,
    EnrollmentRefused,
    NotFound,
    PeerReason,
    PeerRejected,
    TokenReason,
)
from tapproof.logs import log_event
from tapproof.pki import certs, csr
from tapproof.pki.ca import LocalCA
from tapproof.pki.verify import spiffe_id_of
from tapproof.policy import model as policy
from tapproof.store import CertificateRecord, PolicyRuleRecord, RegistryVersion, ServiceRecord, Store, TokenRecord
from tapproof.units import format_hostport, parse_hostport

log = logging.getLogger(__name__)

ISSUED = Counter("tapproof_server_certificates_issued", "Certificates issued", ["kind"])
ENROLL_REFUSED = Counter("tapproof_server_enrollments_refused", "Enrollments refused", ["reason"])
RENEWED_AFTER_EXPIRY = Counter(
    "tapproof_server_renewals_after_expiry", "Renewals accepted from an expired certificate (renewal grace)"
)
MAX_TOKEN_TTL = dt.timedelta(days=7)
SERVER_STALE = dt.timedelta(days=1)
"""A server that has not announced itself for this long drops out of join strings."""
MAX_SERVERS = 16
"""At most this many addresses go into a join string (it must stay short enough to paste)."""
REGISTRY_MAX_AGE = 60.0
"""Seconds a rendered registry is served without re-reading the rows even if the version stands: bounds how long
a write that did not bump the version (a server older than schema v4 during a rolling upgrade, a manual edit)
stays unseen. At 10,000 hosts one render costs ~0.2 s of CPU: a few per mille of a core per server."""


def content_tag(body: Any) -> str:
    """A strong ETag (quoted) for a JSON body: SHA-256 of its canonical encoding, 128 bits."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return '"' + hashlib.sha256(canonical).hexdigest()[:32] + '"'


@dataclasses.dataclass(frozen=True)
class Issued:
    """A freshly issued certificate chain and the trust bundle to go with it."""

    spiffe_id: str
    chain_pem: str
    bundle_pem: str
    not_after: dt.datetime
    serial: str


class ControlPlane:
    """The control plane's operations, one method per API call."""

    def __init__(self, store: Store, ca: LocalCA, config: ServerConfig, clock: Clock, server_addresses: list[str]):
        self.store = store
        self.ca = ca
        self.config = config
        self.clock = clock
        self.td = ca.trust_domain
        self.server_addresses = server_addresses
        self.name = str(identity.server_id(self.td))
        self._revoked_cache: tuple[float, frozenset[str]] = (-1e9, frozenset())
        self._registry_cache: tuple[RegistryVersion, float, str, dict[str, Any]] | None = None
        self._registry_encoded: tuple[str, bytes] | None = None  # (ETag, JSON) of the cached body
        self._render_lock = threading.Lock()
        self._lock = threading.Lock()
        self.server_leaf: Any = None  # this server's own TLS certificate (set by the runner)

    # --- helpers -------------------------------------------------------------
    def audit(self, actor: str, event: str, **detail: Any) -> None:
        """Append to the audit log."""
        self.store.append_audit(self.clock.now(), actor, event, detail)

    def _record(self, chain: tuple[Any, ...], kind: str, host: str | None) -> CertificateRecord:
        leaf = chain[0]
        return CertificateRecord(
            serial=certs.serial_hex(leaf),
            spiffe_id=_sid(leaf),
            kind=kind,  # type: ignore[arg-type]
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            issued_at=self.clock.now(),
            issuer=self.config.name,
            host=host,
            root=self.ca.root_fingerprint,
        )

    def bundle_pem(self) -> str:
        """The trust bundle: every root in the store (active, prepared, retiring)."""
        roots = self.store.list_trust_roots()
        if not roots:
            return certs.to_pem(self.ca.root).decode()
        return "".join(r.cert_pem for r in roots)

    def bundle_fingerprints(self) -> list[str]:
        """Fingerprints of the roots in the bundle, oldest first."""
        return [r.fingerprint for r in self.store.list_trust_roots()] or [self.ca.root_fingerprint]

    def revoked_serials(self, max_age: float = 2.0) -> frozenset[str]:
        """Revoked serials, cached for ``max_age`` seconds (checked on every API connection)."""
        now_m = self.clock.monotonic()
        with self._lock:
            ts, cached = self._revoked_cache
            if now_m - ts < max_age:
                return cached
        fresh = frozenset(self.store.revoked_serials(self.clock.now()))
        with self._lock:
            self._revoked_cache = (now_m, fresh)
        return fresh

    # --- servers sharing the database -----------------------------------------
    def announce(self) -> None:
        """Record this server's addresses in the store (at start, then periodically)."""
        for address in self.server_addresses:
            self.store.register_server(address, self.clock.now())

    def known_servers(self) -> list[str]:
        """Every server agents may use: this one's addresses first, then the others that announced recently."""
        others = self.store.list_servers(self.clock.now() - SERVER_STALE)
        return [*self.server_addresses, *(a for a in others if a not in self.server_addresses)][:MAX_SERVERS]

    # --- tokens and enrollment ------------------------------------------------
    def create_token(self, host: str, ttl: dt.timedelta, actor: str) -> str:
        """Make a one-time join string for ``host``; store only its hash."""
        identity.check_name(host, what="--host")
        if not dt.timedelta(seconds=10) <= ttl <= MAX_TOKEN_TTL:
            raise ConfigError("--ttl: must be between 10s and 7d")
        try:
            h = self.store.get_host(host)
            if h.revoked_at is not None:
                raise ConfigError(f"--host: {host} is revoked; a revoked name cannot enroll again")
        except NotFound:
            pass
        secret = new_secret()
        now = self.clock.now()
        self.store.add_token(TokenRecord(hash_secret(secret), host, now, now + ttl, None, actor))
        self.audit(actor, "token-create", host=host, expires_at=(now + ttl).isoformat())
        js = JoinString(tuple(self.known_servers()), self.td, self.ca.root_fingerprint, secret)
        return js.encode()

    def enroll(self, secret: str, csr_pem: str, source: str, *, tls_key: bytes) -> Issued:
        """Redeem a token with a CSR; the identity comes from the token, never the CSR.

        ``tls_key`` (SPKI DER) is the key of the certificate the client presented on this
        TLS connection (required: there is no unbound enrollment): the CSR must be for that key, so
        the token is redeemed by whoever proved possession of it in the handshake. Checked
        before the token is looked at: a mismatch spends nothing.

        The same key may repeat a redemption for :data:`~tapproof.store.base.REPEAT_WINDOW`
        after the first use (the store records the key's hash; never past the token's
        expiry, nor once a certificate issued since was revoked or a later token enrolled
        the host): an agent whose server died after the commit and before the answer asks
        again, on any server, and gets a certificate instead of ``used``. Logged as
        ``enroll-repeated``.
        """
        if not isinstance(secret, str) or not 20 <= len(secret) <= 128:
            ENROLL_REFUSED.labels(TokenReason.UNKNOWN.value).inc()
            raise EnrollmentRefused(TokenReason.UNKNOWN)
        self._check_bound(csr_pem, tls_key, source)
        now = self.clock.now()
        issued: dict[str, Any] = {}

        def issue(host: str) -> CertificateRecord:
            sid = identity.host_id(self.td, host)
            key = csr.check(csr_pem, sid)
            chain = self.ca.issue(key, sid, now, self.config.leaf_ttl)
            issued["chain"] = chain
            return self._record(chain, "host", host)

        try:
            token, record = self.store.redeem_token(
                hash_secret(secret), now, issue, key=hashlib.sha256(tls_key).hexdigest()
            )
        except EnrollmentRefused as exc:
            ENROLL_REFUSED.labels(exc.reason.value).inc()
            log_event(log, "enroll-refused", level=logging.WARNING, reason=exc.reason.value, source=source)
            raise
        ISSUED.labels("host").inc()
        repeated = token.used_at != now
        fields: dict[str, Any] = {"host": token.host, "serial": record.serial, "source": source}
        self.audit("token:" + hash_secret(secret)[:12], "enroll-repeated" if repeated else "enroll", **fields)
        log_event(log, "enroll-repeated" if repeated else "enrolled", **fields)
        return self._issued(issued["chain"])

    @staticmethod
    def _check_bound(csr_pem: str, tls_key: bytes, source: str) -> None:
        """Refuse a CSR whose key is not the TLS client certificate's key (CSRRejected KEY_MISMATCH)."""
        try:
            asked = csr.public_key_der(csr_pem)
        except CSRRejected as exc:
            ENROLL_REFUSED.labels("csr-" + exc.reason.value).inc()
            raise
        if asked != tls_key:
            ENROLL_REFUSED.labels("csr-" + CSRReason.KEY_MISMATCH.value).inc()
            log_event(
                log,
                "enroll-refused",
                level=logging.WARNING,
                reason="csr-" + CSRReason.KEY_MISMATCH.value,
                source=source,
            )
            raise CSRRejected(CSRReason.KEY_MISMATCH, "the csr is not for the key of the TLS client certificate")

    def _issued(self, chain: tuple[Any, ...]) -> Issued:
        return Issued(
            spiffe_id=_sid(chain[0]),
            chain_pem=certs.to_pem(chain).decode(),
            bundle_pem=self.bundle_pem(),
            not_after=chain[0].not_valid_after_utc,
            serial=certs.serial_hex(chain[0]),
        )

    def renew(self, peer: identity.SpiffeID, csr_pem: str, serial: str = "", *, after_expiry: bool = False) -> Issued:
        """Issue a new certificate (new key) for an authenticated host.

        ``serial`` is the certificate the peer presented: a revoked one cannot
        renew itself into a fresh one (checked against the store, not a cache).
        ``after_expiry``: that certificate expired within the renewal grace
        (``--renew-grace``); it must also be on record, unrevoked, and the
        latest one issued to the host (an older one whose successor exists is
        refused). Each such renewal is logged (``renew-after-expiry``) and counted.
        """
        if peer.kind is not identity.Kind.HOST:
            raise PeerRejected(PeerReason.WRONG_IDENTITY, f"{peer} cannot renew (hosts only)")
        if serial and serial in self.revoked_serials(max_age=0):
            raise PeerRejected(PeerReason.REVOKED, f"certificate {serial} of {peer} is revoked")
        try:
            host = self.store.get_host(peer.name)
        except NotFound as exc:
            raise PeerRejected(PeerReason.UNTRUSTED, f"{peer} is not an enrolled host") from exc
        if host.revoked_at is not None:
            raise PeerRejected(PeerReason.REVOKED, f"{peer} is revoked")
        if after_expiry:
            self._check_expired_renewal(peer, serial)
        key = csr.check(csr_pem, peer)
        chain = self.ca.issue(key, peer, self.clock.now(), self.config.leaf_ttl)
        rec = self._record(chain, "host", peer.name)
        self.store.record_certificate(rec)
        self.store.update_host_seen(peer.name, self.clock.now())
        ISSUED.labels("host").inc()
        self.audit(str(peer), "renew", serial=rec.serial, **({"after_expiry": serial} if after_expiry else {}))
        if after_expiry:
            RENEWED_AFTER_EXPIRY.inc()
            log_event(
                log,
                "renew-after-expiry",
                level=logging.WARNING,
                host=peer.name,
                expired_serial=serial,
                serial=rec.serial,
            )
        return self._issued(chain)

    def _check_expired_renewal(self, peer: identity.SpiffeID, serial: str) -> None:
        """An expired certificate may renew only if on record, unrevoked and the host's latest (fail closed)."""
        try:
            presented = self.store.get_certificate(serial)
        except NotFound as exc:
            raise PeerRejected(PeerReason.UNTRUSTED, f"expired certificate {serial} of {peer} not on record") from exc
        if presented.revoked_at is not None:  # revoked_serials() forgets expired ones: check the record itself
            raise PeerRejected(PeerReason.REVOKED, f"expired certificate {serial} of {peer} is revoked")
        latest = self.store.latest_certificate(peer.name)
        if presented.host != peer.name or latest is None or latest.serial != serial:
            raise PeerRejected(
                PeerReason.EXPIRED,
                f"expired certificate {serial} of {peer} is superseded by {latest.serial if latest else '?'}",
            )

    # --- registry ---------------------------------------------------------------
    def register(
        self, peer: identity.SpiffeID, advertise: str, services: dict[str, str], bundle: list[str] | None = None
    ) -> None:
        """Record the host's advertised tunnel address, the services it fronts and the roots it holds."""
        if peer.kind is not identity.Kind.HOST:
            raise PeerRejected(PeerReason.WRONG_IDENTITY, f"{peer} cannot register services")
        parse_hostport(advertise, what="advertise")
        now = self.clock.now()
        recs = [
            ServiceRecord(identity.check_name(name, what="service"), peer.name, advertise, now) for name in services
        ]
        held = ",".join(sorted(f for f in bundle if isinstance(f, str))[:8]) if bundle is not None else None
        self.store.update_host_seen(peer.name, now, advertise, bundle=held)
        self.store.register_services(peer.name, recs)

    def registry_tagged(self) -> tuple[str, dict[str, Any]]:
        """(ETag, registry body: hosts with their tunnel addresses, services with where they are; shared,
        do not modify). The body is rendered once per registry version (and at least every
        :data:`REGISTRY_MAX_AGE` seconds) and kept in this process; each call reads only the version (one
        row), so a change made through another server sharing the database is seen at the next call. The
        tag is the version counter and a digest of the body, so one body gets one tag on every server."""
        version = self.store.registry_version()
        now_m = self.clock.monotonic()
        with self._lock:
            cached = self._registry_cache
        if cached is not None and cached[0] == version and now_m - cached[1] < REGISTRY_MAX_AGE:
            return cached[2], cached[3]
        with self._render_lock:  # one render at a time: the others wait and take its result
            with self._lock:
                cached = self._registry_cache
            if cached is not None and cached[0] == version and now_m - cached[1] < REGISTRY_MAX_AGE:
                return cached[2], cached[3]
            return self._render_registry(now_m)

    def _render_registry(self, now_m: float) -> tuple[str, dict[str, Any]]:
        snap = self.store.registry_snapshot()  # version and content from one snapshot: never a stale body
        hosts = {h.name: {"advertise": h.advertise, "revoked": h.revoked_at is not None} for h in snap.hosts}
        services = [
            {
                "name": s.name,
                "host": s.host,
                "advertise": s.advertise,
                "spiffe_id": str(identity.service_id(self.td, s.name)),
            }
            for s in snap.services
        ]
        body = {"hosts": hosts, "services": services}
        etag = f'"{snap.version.counter}-{content_tag(body)[1:-1]}"'
        with self._lock:  # renders are serialised, so this is the newest read: replace whatever was cached
            self._registry_cache = (snap.version, now_m, etag, body)  # (even an older version: a restored database)
        return etag, body

    def registry_encoded(self) -> tuple[str, bytes]:
        """(ETag, the registry body as JSON bytes), encoded once per tag."""
        etag, body = self.registry_tagged()
        with self._lock:
            cached = self._registry_encoded
        if cached is not None and cached[0] == etag:
            return cached
        encoded = (etag, json.dumps(body).encode())
        with self._lock:
            self._registry_encoded = encoded
        return encoded

    # --- policy --------------------------------------------------------------------
    def policy(self) -> dict[str, Any]:
        """Rules, default and version (agents poll this with ETag)."""
        version, rules = self.store.list_policy_rules()
        default = self.store.get_setting("default_policy", "allow") or "allow"
        return {
            "version": f"{version}-{default}",
            "default": default,
            "rules": [
                {
                    "id": r.rule_id,
                    "action": r.action,
                    "source": r.source,
                    "service": r.service,
                    "ports": r.ports,
                    "comment": r.comment,
                }
                for r in rules
            ],
        }

    def add_rule(self, action: str, source: str, service: str, ports: str, comment: str, actor: str) -> int:
        """Validate and store a rule."""
        if action not in ("allow", "deny"):
            raise ConfigError(f"action: {action!r} is not allow or deny")
        src = policy.parse_source(source, self.td)
        svc = policy.parse_service(service)
        rng = policy.format_ports(policy.parse_ports(ports))
        rec = self.store.add_policy_rule(
            PolicyRuleRecord(0, action, src, svc, rng, self.clock.now(), comment[:200])  # type: ignore[arg-type]
        )
        self.audit(actor, "policy-add", rule_id=rec.rule_id, action=action, source=src, service=svc, ports=rng)
        return rec.rule_id

    def remove_rule(self, rule_id: int, actor: str) -> None:
        """Delete a rule."""
        self.store.remove_policy_rule(rule_id)
        self.audit(actor, "policy-remove", rule_id=rule_id)

    def set_default_policy(self, value: str, actor: str) -> None:
        """Set ``default_policy`` to allow or deny."""
        if value not in ("allow", "deny"):
            raise ConfigError(f"default_policy: {value!r} is not allow or deny")
        self.store.set_setting("default_policy", value)
        self.audit(actor, "policy-default", value=value)

    # --- revocation ------------------------------------------------------------------
    def revoke_host(self, name: str, reason: str, actor: str) -> list[str]:
        """Revoke a host and its live certificates."""
        serials = self.store.revoke_host(name, self.clock.now(), reason[:200])
        with self._lock:
            self._revoked_cache = (-1e9, frozenset())
        self.audit(actor, "revoke-host", host=name, serials=serials, reason=reason[:200])
        log_event(log, "revoked", level=logging.WARNING, host=name, serials=serials)
        return serials

    def revoke_serial(self, serial: str, reason: str, actor: str) -> str:
        """Revoke one certificate by serial (hex)."""
        serial = serial.lower().removeprefix("0x")
        rec = self.store.revoke_certificate(serial, self.clock.now())
        with self._lock:
            self._revoked_cache = (-1e9, frozenset())
        self.audit(actor, "revoke-serial", serial=serial, spiffe_id=rec.spiffe_id, reason=reason[:200])
        return rec.spiffe_id

    def revocations(self) -> dict[str, Any]:
        """What agents need to refuse revoked peers: O(revoked) reads (indexed), never a scan of every host."""
        return {"serials": sorted(self.store.revoked_serials(self.clock.now())), "hosts": self.store.revoked_hosts()}

    # --- status ---------------------------------------------------------------------
    def status(self, soon: dt.timedelta = dt.timedelta(minutes=15)) -> dict[str, Any]:
        """CA expiry, counts, certificates expiring soon."""
        now = self.clock.now()
        hosts = self.store.list_hosts()
        expiring = self.store.certificates_expiring(now, soon)
        return {
            "trust_domain": self.td,
            "server": self.name,
            "now": now.isoformat(),
            "root": {
                "not_after": self.ca.root.not_valid_after_utc.isoformat(),
                "fingerprint": self.ca.root_fingerprint,
            },
            "intermediate": {"not_after": self.ca.intermediate.not_valid_after_utc.isoformat()},
            "hosts": {"total": len(hosts), "revoked": sum(1 for h in hosts if h.revoked_at is not None)},
            "services": len(self.store.list_services()),
            "leaf_ttl_seconds": int(self.config.leaf_ttl.total_seconds()),
            "expiring_soon": [
                {"serial": c.serial, "spiffe_id": c.spiffe_id, "not_after": c.not_after.isoformat()} for c in expiring
            ],
            "default_policy": self.store.get_setting("default_policy", "allow"),
            "addresses": self.server_addresses,
            "unsafe_classical_groups": self.config.unsafe_classical_groups,
            **self.ca_status(now),
        }

    def ca_status(self, now: dt.datetime, warn: str | None = None) -> dict[str, Any]:
        """Every expiry (this server's leaf, every intermediate, every root) and the rotation state."""
        from tapproof.pki import expiry, rotation

        policy = expiry.parse_warn(warn or self.config.expiry_warn)
        roots = self.store.list_trust_roots()
        items: list[dict[str, Any]] = []
        if self.server_leaf is not None:
            items.append({**expiry.of_cert("leaf", self.server_leaf).to_json(now, policy), "server": self.config.name})
        for i in self.store.list_intermediates():
            if i.not_after > now:
                cert = certs.load_pem_chain(i.cert_pem.encode())[0]
                items.append({**expiry.of_cert("intermediate", cert).to_json(now, policy), "server": i.server})
        for r in roots:
            cert = certs.load_pem_chain(r.cert_pem.encode())[0]
            items.append({**expiry.of_cert("root", cert).to_json(now, policy), "state": r.state})
        return {
            "expiries": items,
            "expiry_warn": warn or self.config.expiry_warn,
            "warnings": [f"{e['kind']} {e['name']} expires in {e['seconds_left']}s" for e in items if e["warn"]],
            "ca": {
                "phase": rotation.phase(roots),
                "servers": [
                    {"name": s.name, "root": s.root[:16], "seen": s.seen_at.isoformat()}
                    for s in self.store.list_ca_servers()
                ],
                "pending_requests": [r.server for r in self.store.list_ca_requests()],
            },
        }


def _sid(leaf: Any) -> str:
    return str(spiffe_id_of(leaf))


def address_list(listen: str, bound_port: int, advertise: tuple[str, ...]) -> list[str]:
    """Addresses to put into join strings: the configured ones, or the bound listen address."""
    if advertise:
        return list(advertise)
    host, _ = parse_hostport(listen, what="--listen", allow_zero=True)
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listen is reached via loopback locally
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    return [format_hostport(host, bound_port)]
