"""The Store interface and its records.

One interface, two backends (``sqlite:///PATH`` and ``postgresql://...``), one
conformance suite (``tests/store``) run against both. All times are aware UTC
datetimes. Every method is one transaction. Methods raise
:class:`~tapproof.errors.StoreError` subclasses (``NotFound``, ``Conflict``,
``SchemaMismatch``, ``StoreUnavailable``); :meth:`Store.redeem_token` also
raises :class:`~tapproof.errors.EnrollmentRefused` and passes on whatever its
``issue`` callback raises (e.g. ``CSRRejected``). Caller mistakes are plain
``ValueError``/``TypeError``: a naive datetime, a service record for another
host, an audit ``detail`` that is not JSON.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

CertKind = Literal["host", "server", "admin", "intermediate"]
RootState = Literal["active", "prepared", "retiring"]


REPEAT_WINDOW = dt.timedelta(minutes=10)
"""How long after a token's first use its redeeming key may repeat the redemption (never past expiry)."""


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """A join token; only the SHA-256 of its secret is stored (hex)."""

    token_hash: str
    host: str
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None = None
    created_by: str = ""
    redeemed_key: str = ""
    """SHA-256 (hex) of the public key (SPKI DER) that redeemed it; "" while unused."""


@dataclasses.dataclass(frozen=True)
class HostRecord:
    """An enrolled (or about-to-be) host."""

    name: str
    spiffe_id: str
    created_at: dt.datetime
    enrolled_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    revoke_reason: str = ""
    advertise: str = ""  # HOST:PORT peers dial for this host's agent tunnel port
    last_seen: dt.datetime | None = None
    bundle: str = ""  # the root fingerprints the host's agent reported holding, comma-separated


@dataclasses.dataclass(frozen=True)
class CertificateRecord:
    """An issued certificate (never its key). ``serial`` is lower-case hex."""

    serial: str
    spiffe_id: str
    kind: CertKind
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime
    issuer: str  # which server (its SPIFFE ID or name) signed it
    host: str | None = None
    revoked_at: dt.datetime | None = None
    root: str = ""  # fingerprint of the root the issued chain ends at ("" before schema v2)


@dataclasses.dataclass(frozen=True)
class ServiceRecord:
    """A service an agent fronts: ``spiffe://TD/svc/NAME`` on ``host``, reachable at ``advertise``."""

    name: str
    host: str
    advertise: str
    registered_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class PolicyRuleRecord:
    """One policy rule. ``rule_id`` is assigned by the store (0 before insertion)."""

    rule_id: int
    action: Literal["allow", "deny"]
    source: str  # identity pattern, e.g. "spiffe://TD/host/web-*"
    service: str  # service pattern, e.g. "redis" or "*"
    ports: str = ""  # "" (any) or "6379,7000-7010"
    created_at: dt.datetime | None = None
    comment: str = ""


@dataclasses.dataclass(frozen=True)
class TrustRootRecord:
    """A root CA certificate in the trust bundle."""

    fingerprint: str  # SHA-256 of the DER, 64 lower-case hex
    cert_pem: str
    state: RootState
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class IntermediateRecord:
    """An intermediate CA certificate of one server (its key stays in that server's data dir)."""

    fingerprint: str  # SHA-256 of the DER
    server: str  # the server's name (``name`` in its server.toml)
    key_id: str  # SHA-256 of the certified public key (SPKI DER): one key may be certified under several roots
    root: str  # fingerprint of the root that signed it
    cert_pem: str
    not_before: dt.datetime
    not_after: dt.datetime
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class CARequestRecord:
    """A server's pending request for an intermediate (a CSR), waiting for whoever holds the root key."""

    key_id: str
    server: str
    csr_pem: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class CAServerRecord:
    """What one server serves now: its intermediate, the root that chain ends at, the bundle it trusts."""

    name: str
    intermediate: str  # fingerprint of the intermediate in use
    root: str  # fingerprint of the root the server's own certificate chains to
    bundle: str  # root fingerprints it trusts, comma-separated
    seen_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class RegistryVersion:
    """Where the registry's content stands: ``counter`` moves with every change to it; ``epoch`` is
    random per database (so two databases, or a re-created one, do not share versions)."""

    counter: int
    epoch: str


@dataclasses.dataclass(frozen=True)
class RegistrySnapshot:
    """Everything ``/v1/registry`` renders, read in one snapshot with the version it is at."""

    version: RegistryVersion
    hosts: list[HostRecord]
    services: list[ServiceRecord]


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """One line of the append-only audit log. ``entry_id`` is assigned by the store."""

    entry_id: int
    ts: dt.datetime
    actor: str
    action: str
    detail: dict[str, Any]


class Store(Protocol):
    """What the control plane needs from a database."""

    # --- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        """Release connections."""
        ...

    def schema_version(self) -> int:
        """Return the schema version of the database (0 if empty)."""
        ...

    # --- settings (small key/value: default_policy, leaf_ttl, ...) ---------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        """Return a setting or ``default``."""
        ...

    def set_setting(self, key: str, value: str) -> None:
        """Set a setting."""
        ...

    # --- control-plane servers sharing the database ----------------------
    def register_server(self, address: str, now: dt.datetime) -> None:
        """Record that a server answers at ``address`` (HOST:PORT) as of ``now``."""
        ...

    def list_servers(self, since: dt.datetime) -> list[str]:
        """Addresses of servers registered at or after ``since``, most recently seen first."""
        ...

    # --- trust roots -------------------------------------------------------
    def add_trust_root(self, root: TrustRootRecord) -> None:
        """Add a root (Conflict if the fingerprint exists)."""
        ...

    def set_trust_root_state(self, fingerprint: str, state: RootState) -> None:
        """Change a root's state (NotFound if absent)."""
        ...

    def remove_trust_root(self, fingerprint: str) -> None:
        """Remove a root from the bundle (NotFound if absent)."""
        ...

    def list_trust_roots(self) -> list[TrustRootRecord]:
        """All roots, oldest first."""
        ...

    def add_trust_root_if(self, root: TrustRootRecord, expected: Mapping[str, RootState]) -> None:
        """Add ``root`` only if the roots are exactly ``expected`` (fingerprint -> state), in one
        transaction: Conflict otherwise (someone else prepared a root first). ``rotate prepare``."""
        ...

    def transition_trust_roots(
        self, expected: Mapping[str, RootState], changes: Mapping[str, RootState | None]
    ) -> None:
        """Compare-and-set several roots in one transaction (a rotation step).

        Every root in ``expected`` must exist in that state (Conflict otherwise:
        someone else moved the rotation on); then each root in ``changes`` gets
        its new state, ``None`` removing it.
        """
        ...

    # --- CA state (per-server intermediates) -------------------------------
    def add_intermediate(self, rec: IntermediateRecord) -> None:
        """Record an intermediate certificate (Conflict on a duplicate fingerprint)."""
        ...

    def list_intermediates(self, server: str | None = None) -> list[IntermediateRecord]:
        """Intermediates (of one server, or all), oldest first."""
        ...

    def add_ca_request(self, req: CARequestRecord) -> None:
        """Queue a signing request (Conflict if one exists for that key)."""
        ...

    def list_ca_requests(self) -> list[CARequestRecord]:
        """Pending signing requests, oldest first."""
        ...

    def remove_ca_request(self, key_id: str) -> None:
        """Drop a request once signed (NotFound if absent)."""
        ...

    def heartbeat_ca_server(self, rec: CAServerRecord) -> None:
        """Insert or replace what server ``rec.name`` serves now."""
        ...

    def list_ca_servers(self) -> list[CAServerRecord]:
        """Every server that ever reported, by name."""
        ...

    # --- tokens and enrollment ---------------------------------------------
    def add_token(self, token: TokenRecord) -> None:
        """Store a new token (Conflict if the hash exists)."""
        ...

    def redeem_token(
        self,
        token_hash: str,
        now: dt.datetime,
        issue: Callable[[str], CertificateRecord],
        key: str = "",
    ) -> tuple[TokenRecord, CertificateRecord]:
        """Atomically spend a token and record the certificate ``issue(host_name)`` returns.

        In ONE transaction, with the token row locked: refuse with
        ``EnrollmentRefused(UNKNOWN|EXPIRED|USED|HOST_REVOKED)``; else call
        ``issue(token.host)`` (it signs; if it raises, nothing is changed and
        the token stays unspent), insert the certificate, mark the token used
        at ``now`` by ``key`` (SHA-256 hex of the redeeming public key), and
        create or update the host record (``enrolled_at=now``, created if new:
        that bumps the registry version).
        Two concurrent redemptions of one token: exactly one succeeds, the
        other gets ``USED``.

        A repeat by the SAME key (non-empty ``key`` equal to the one stored),
        within :data:`REPEAT_WINDOW` of the first use and before the token's
        expiry, is not refused: the host lost the answer (a server died after
        the commit), so ``issue`` runs again and the new certificate is
        recorded; the token keeps its first ``used_at`` (how a caller tells a
        repeat). It is ``USED`` instead for any other key, or once the host was
        enrolled by a later token or one of its certificates issued since the
        first use was revoked (a revocation must not be undone by a repeat);
        ``HOST_REVOKED`` if the host was revoked.
        """
        ...

    def list_tokens(self, *, include_used: bool = False) -> list[TokenRecord]:
        """Tokens, newest first (unused ones only unless ``include_used``)."""
        ...

    # --- hosts -------------------------------------------------------------
    def get_host(self, name: str) -> HostRecord:
        """Return a host (NotFound if absent)."""
        ...

    def list_hosts(self) -> list[HostRecord]:
        """All hosts, by name."""
        ...

    def revoked_hosts(self) -> list[str]:
        """Names of the revoked hosts, sorted (reads only revoked rows)."""
        ...

    def update_host_seen(
        self, name: str, now: dt.datetime, advertise: str | None = None, bundle: str | None = None
    ) -> None:
        """Record that a host checked in (and its advertised address and held bundle if given); NotFound if unknown.

        Bumps the registry version if ``advertise`` differs from the stored one."""
        ...

    def revoke_host(self, name: str, now: dt.datetime, reason: str) -> list[str]:
        """Revoke a host and all its unexpired certificates; return their serials (NotFound if absent).

        Bumps the registry version the first time (the host shows as revoked)."""
        ...

    # --- certificates ------------------------------------------------------
    def record_certificate(self, cert: CertificateRecord) -> None:
        """Record an issued certificate (Conflict on a duplicate serial)."""
        ...

    def get_certificate(self, serial: str) -> CertificateRecord:
        """Return a certificate record (NotFound if absent)."""
        ...

    def revoke_certificate(self, serial: str, now: dt.datetime) -> CertificateRecord:
        """Mark a certificate revoked (NotFound if absent); idempotent."""
        ...

    def revoked_serials(self, now: dt.datetime) -> list[str]:
        """Serials revoked and not yet expired at ``now``."""
        ...

    def certificates_expiring(self, now: dt.datetime, within: dt.timedelta) -> list[CertificateRecord]:
        """Unrevoked certificates with ``now <= not_after < now + within``."""
        ...

    def unexpired_certificates(self, now: dt.datetime) -> list[CertificateRecord]:
        """Unrevoked certificates with ``not_after > now``, oldest issuance first."""
        ...

    def latest_certificate(self, host: str) -> CertificateRecord | None:
        """The certificate issued last to ``host`` (revoked or not, expired or not), or None."""
        ...

    # --- services ----------------------------------------------------------
    def register_services(self, host: str, services: Sequence[ServiceRecord]) -> None:
        """Replace the set of services ``host`` fronts with ``services``.

        Bumps the registry version if the set of (name, advertise) changes; a
        registration that changes neither writes nothing (``registered_at`` stays)."""
        ...

    def list_services(self) -> list[ServiceRecord]:
        """All services, by (name, host)."""
        ...

    # --- registry version (what agents poll with ETag) ---------------------
    def registry_version(self) -> RegistryVersion:
        """The registry's version: one one-row read. Every write that changes what
        :meth:`registry_snapshot` returns (a host created by enrollment, a host's
        ``advertise`` or revocation, a host's services) bumps it in its own transaction."""
        ...

    def registry_snapshot(self) -> RegistrySnapshot:
        """The version, all hosts and all services, read in one snapshot."""
        ...

    # --- policy ------------------------------------------------------------
    def add_policy_rule(self, rule: PolicyRuleRecord) -> PolicyRuleRecord:
        """Insert a rule; return it with its id. Bumps the policy version."""
        ...

    def remove_policy_rule(self, rule_id: int) -> None:
        """Delete a rule (NotFound if absent). Bumps the policy version."""
        ...

    def list_policy_rules(self) -> tuple[int, list[PolicyRuleRecord]]:
        """Return (policy version, rules in id order) read in one transaction."""
        ...

    # --- audit log (append-only: no update or delete exists) ---------------
    def append_audit(self, ts: dt.datetime, actor: str, action: str, detail: dict[str, Any]) -> int:
        """Append an entry; return its id."""
        ...

    def list_audit(self, *, since_id: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Entries with id > since_id, oldest first."""
        ...
