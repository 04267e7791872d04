"""The one SQL implementation of :class:`~tapproof.store.base.Store` (SQLAlchemy 2 Core).

The same code serves SQLite (``sqlite:///PATH``, the default, embedded) and
PostgreSQL (``postgresql://...``, several servers sharing one database). Where
the two differ it is in :mod:`tapproof.store.engine` (locking, pragmas, pool)
and :mod:`tapproof.store.migrations` (DDL), not here.

How the promises of :mod:`tapproof.store.base` are kept:

* one method, one transaction (:func:`~tapproof.store.engine.run_tx`);
* token redemption locks the token row (``SELECT ... FOR UPDATE`` on
  PostgreSQL; ``BEGIN IMMEDIATE`` serialises every writer on SQLite), so two
  concurrent redemptions of one token cannot both succeed;
* the policy version lives in one row that every rule change updates FIRST,
  so concurrent edits queue on its row lock and no bump is lost; the reader
  uses a REPEATABLE READ snapshot on PostgreSQL;
* the registry version (``registry_state``) is bumped LAST by every write that
  changed the registry's content (after its other row locks, so no lock cycle),
  with ``version = version + 1`` (no lost bump); writes that change nothing do
  not take it, and a host's registrations queue on the host's row lock, so a
  comparison "unchanged" cannot race with another change of the same host;
* audit entries are appended under a transaction-scoped advisory lock on
  PostgreSQL, so ids become visible in id order and ``list_audit(since_id=)``
  pollers never skip an entry; nothing updates or deletes them (and a trigger
  refuses it on both dialects).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect

from tapproof.errors import (
    Conflict,
    EnrollmentRefused,
    NotFound,
    SchemaMismatch,
    StoreError,
    StoreUnavailable,
    TokenReason,
)
from tapproof.store import migrations
from tapproof.store.base import (
    REPEAT_WINDOW,
    AuditEntry,
    CARequestRecord,
    CAServerRecord,
    CertificateRecord,
    HostRecord,
    IntermediateRecord,
    PolicyRuleRecord,
    RegistrySnapshot,
    RegistryVersion,
    RootState,
    ServiceRecord,
    TokenRecord,
    TrustRootRecord,
)
from tapproof.store.engine import make_engine, parse_url, redact, run_tx
from tapproof.store.schema import (
    audit_log,
    ca_intermediates,
    ca_requests,
    ca_servers,
    certificates,
    hosts,
    policy_rules,
    policy_state,
    registry_state,
    services,
    settings,
    tokens,
    trust_roots,
)

T = TypeVar("T")

_SERVER_PREFIX = "server-address/"  # settings key of a registered control-plane server
_AUDIT_LOCK_KEY = 0x7461_7070_0001  # pg_advisory_xact_lock key for audit appends ("tapp")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _token(row: sa.Row[Any]) -> TokenRecord:
    m = row._mapping
    return TokenRecord(
        token_hash=m["token_hash"],
        host=m["host"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        used_at=m["used_at"],
        created_by=m["created_by"],
        redeemed_key=m["redeemed_key"],
    )


def _host(row: sa.Row[Any]) -> HostRecord:
    m = row._mapping
    return HostRecord(
        name=m["name"],
        spiffe_id=m["spiffe_id"],
        created_at=m["created_at"],
        enrolled_at=m["enrolled_at"],
        revoked_at=m["revoked_at"],
        revoke_reason=m["revoke_reason"],
        advertise=m["advertise"],
        last_seen=m["last_seen"],
        bundle=m["bundle"],
    )


def _cert(row: sa.Row[Any]) -> CertificateRecord:
    m = row._mapping
    return CertificateRecord(
        serial=m["serial"],
        spiffe_id=m["spiffe_id"],
        kind=m["kind"],
        not_before=m["not_before"],
        not_after=m["not_after"],
        issued_at=m["issued_at"],
        issuer=m["issuer"],
        host=m["host"],
        revoked_at=m["revoked_at"],
        root=m["root"],
    )


def _cert_values(cert: CertificateRecord) -> dict[str, Any]:
    return {
        "serial": cert.serial,
        "spiffe_id": cert.spiffe_id,
        "kind": cert.kind,
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        "issued_at": cert.issued_at,
        "issuer": cert.issuer,
        "host": cert.host,
        "revoked_at": cert.revoked_at,
        "root": cert.root,
    }


def _rule(row: sa.Row[Any]) -> PolicyRuleRecord:
    m = row._mapping
    return PolicyRuleRecord(
        rule_id=int(m["rule_id"]),
        action=m["action"],
        source=m["source"],
        service=m["service"],
        ports=m["ports"],
        created_at=m["created_at"],
        comment=m["comment"],
    )


def _root(row: sa.Row[Any]) -> TrustRootRecord:
    m = row._mapping
    return TrustRootRecord(
        fingerprint=m["fingerprint"],
        cert_pem=m["cert_pem"],
        state=m["state"],
        created_at=m["created_at"],
    )


class SQLStore:
    """A :class:`~tapproof.store.base.Store` on SQLite or PostgreSQL; open it with :func:`open_store`.

    Thread-safe: one instance (one engine, one connection pool) serves every
    thread of the server. Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, engine: sa.Engine) -> None:
        """Wrap an engine made by :func:`tapproof.store.engine.make_engine` (use :func:`open_store`)."""
        self._engine = engine
        self._dialect = engine.dialect.name

    # --- plumbing ------------------------------------------------------------
    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return redact(self._engine.url)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    def __enter__(self) -> SQLStore:
        """Return self."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Close the store."""
        self.close()

    def _read(self, what: str, fn: Callable[[sa.Connection], T], isolation: str | None = None) -> T:
        return run_tx(self._engine, fn, write=False, what=what, isolation=isolation)

    def _write(self, what: str, fn: Callable[[sa.Connection], T]) -> T:
        return run_tx(self._engine, fn, write=True, what=what)

    def _insert(self, table: sa.Table) -> Any:
        """An INSERT that can grow ``ON CONFLICT`` clauses on either dialect."""
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite_dialect.insert(table)

    # --- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def schema_version(self) -> int:
        """Return the schema version of the database (0 if empty)."""
        return self._read("read schema version", migrations.current_version)

    # --- settings ------------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        """Return a setting or ``default``."""

        def body(conn: sa.Connection) -> str | None:
            value = conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar()
            return default if value is None else str(value)

        return self._read("get setting", body)

    def set_setting(self, key: str, value: str) -> None:
        """Set a setting (insert or replace)."""

        def body(conn: sa.Connection) -> None:
            stmt = self._insert(settings).values(key=key, value=value)
            conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value}))

        self._write("set setting", body)

    # --- control-plane servers (rows in settings: no schema change) ------------
    def register_server(self, address: str, now: dt.datetime) -> None:
        """Record that a server answers at ``address`` as of ``now`` (its own row: no contention)."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"naive datetime {now!r}: the store takes aware UTC datetimes")
        self.set_setting(_SERVER_PREFIX + address, now.astimezone(dt.UTC).isoformat())

    def list_servers(self, since: dt.datetime) -> list[str]:
        """Addresses of servers registered at or after ``since``, most recently seen first."""

        def body(conn: sa.Connection) -> list[str]:
            stmt = sa.select(settings.c.key, settings.c.value).where(settings.c.key.startswith(_SERVER_PREFIX))
            seen = [(dt.datetime.fromisoformat(v), k.removeprefix(_SERVER_PREFIX)) for k, v in conn.execute(stmt)]
            return [addr for ts, addr in sorted(seen, key=lambda p: (-p[0].timestamp(), p[1])) if ts >= since]

        return self._read("list servers", body)

    # --- trust roots ---------------------------------------------------------
    def add_trust_root(self, root: TrustRootRecord) -> None:
        """Add a root (Conflict if the fingerprint exists)."""

        def body(conn: sa.Connection) -> None:
            conn.execute(
                trust_roots.insert().values(
                    fingerprint=root.fingerprint,
                    cert_pem=root.cert_pem,
                    state=root.state,
                    created_at=root.created_at,
                )
            )

        self._write("add trust root", body)

    def set_trust_root_state(self, fingerprint: str, state: RootState) -> None:
        """Change a root's state (NotFound if absent)."""

        def body(conn: sa.Connection) -> None:
            result = conn.execute(
                trust_roots.update().where(trust_roots.c.fingerprint == fingerprint).values(state=state)
            )
            if result.rowcount == 0:
                raise NotFound(f"no trust root {fingerprint}")

        self._write("set trust root state", body)

    def remove_trust_root(self, fingerprint: str) -> None:
        """Remove a root from the bundle (NotFound if absent)."""

        def body(conn: sa.Connection) -> None:
            result = conn.execute(trust_roots.delete().where(trust_roots.c.fingerprint == fingerprint))
            if result.rowcount == 0:
                raise NotFound(f"no trust root {fingerprint}")

        self._write("remove trust root", body)

    def list_trust_roots(self) -> list[TrustRootRecord]:
        """All roots, oldest first."""

        def body(conn: sa.Connection) -> list[TrustRootRecord]:
            stmt = sa.select(trust_roots).order_by(trust_roots.c.created_at, trust_roots.c.fingerprint)
            return [_root(r) for r in conn.execute(stmt)]

        return self._read("list trust roots", body)

    def add_trust_root_if(self, root: TrustRootRecord, expected: Mapping[str, RootState]) -> None:
        """Add ``root`` only if the roots are exactly ``expected`` (Conflict otherwise).

        The expected rows are locked first (``FOR UPDATE``: a concurrent caller
        waits here), then every root is read again: under PostgreSQL's READ
        COMMITTED that second statement sees a root the winner committed while
        we waited. SQLite's ``BEGIN IMMEDIATE`` serialises the writers anyway.
        """

        def body(conn: sa.Connection) -> None:
            conn.execute(
                sa.select(trust_roots.c.fingerprint)
                .where(trust_roots.c.fingerprint.in_(list(expected)))
                .with_for_update()
            ).all()
            found = {
                r.fingerprint: r.state for r in conn.execute(sa.select(trust_roots.c.fingerprint, trust_roots.c.state))
            }
            if found != dict(expected):
                now = ", ".join(f"{fp[:16]} {st}" for fp, st in sorted(found.items())) or "none"
                raise Conflict(f"the trust roots changed meanwhile (now: {now})")
            conn.execute(
                trust_roots.insert().values(
                    fingerprint=root.fingerprint, cert_pem=root.cert_pem, state=root.state, created_at=root.created_at
                )
            )

        self._write("add trust root if", body)

    def transition_trust_roots(
        self, expected: Mapping[str, RootState], changes: Mapping[str, RootState | None]
    ) -> None:
        """Compare-and-set several roots in one transaction (rows locked; Conflict on a stale view)."""

        def body(conn: sa.Connection) -> None:
            rows = conn.execute(
                sa.select(trust_roots.c.fingerprint, trust_roots.c.state)
                .where(trust_roots.c.fingerprint.in_(list(expected)))
                .with_for_update()
            ).all()
            found = {r.fingerprint: r.state for r in rows}
            for fp, state in expected.items():
                if found.get(fp) != state:
                    raise Conflict(f"trust root {fp[:16]} is {found.get(fp, 'absent')}, expected {state}")
            for fp, new in changes.items():
                if new is None:
                    conn.execute(trust_roots.delete().where(trust_roots.c.fingerprint == fp))
                else:
                    result = conn.execute(trust_roots.update().where(trust_roots.c.fingerprint == fp).values(state=new))
                    if result.rowcount == 0:
                        raise NotFound(f"no trust root {fp}")

        self._write("transition trust roots", body)

    # --- CA state ----------------------------------------------------------------
    def add_intermediate(self, rec: IntermediateRecord) -> None:
        """Record an intermediate certificate (Conflict on a duplicate fingerprint)."""

        def body(conn: sa.Connection) -> None:
            conn.execute(ca_intermediates.insert().values(**dataclasses.asdict(rec)))

        self._write("add intermediate", body)

    def list_intermediates(self, server: str | None = None) -> list[IntermediateRecord]:
        """Intermediates (of one server, or all), oldest first."""

        def body(conn: sa.Connection) -> list[IntermediateRecord]:
            stmt = sa.select(ca_intermediates).order_by(ca_intermediates.c.created_at, ca_intermediates.c.fingerprint)
            if server is not None:
                stmt = stmt.where(ca_intermediates.c.server == server)
            return [IntermediateRecord(**dict(r._mapping)) for r in conn.execute(stmt)]

        return self._read("list intermediates", body)

    def add_ca_request(self, req: CARequestRecord) -> None:
        """Queue a signing request (Conflict if one exists for that key)."""

        def body(conn: sa.Connection) -> None:
            conn.execute(ca_requests.insert().values(**dataclasses.asdict(req)))

        self._write("add CA request", body)

    def list_ca_requests(self) -> list[CARequestRecord]:
        """Pending signing requests, oldest first."""

        def body(conn: sa.Connection) -> list[CARequestRecord]:
            stmt = sa.select(ca_requests).order_by(ca_requests.c.created_at, ca_requests.c.key_id)
            return [CARequestRecord(**dict(r._mapping)) for r in conn.execute(stmt)]

        return self._read("list CA requests", body)

    def remove_ca_request(self, key_id: str) -> None:
        """Drop a request (NotFound if absent)."""

        def body(conn: sa.Connection) -> None:
            if conn.execute(ca_requests.delete().where(ca_requests.c.key_id == key_id)).rowcount == 0:
                raise NotFound(f"no CA request for key {key_id[:16]}")

        self._write("remove CA request", body)

    def heartbeat_ca_server(self, rec: CAServerRecord) -> None:
        """Insert or replace what server ``rec.name`` serves now."""
        values = dataclasses.asdict(rec)

        def body(conn: sa.Connection) -> None:
            stmt = self._insert(ca_servers).values(**values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=values))

        self._write("CA server heartbeat", body)

    def list_ca_servers(self) -> list[CAServerRecord]:
        """Every server that ever reported, by name."""

        def body(conn: sa.Connection) -> list[CAServerRecord]:
            stmt = sa.select(ca_servers).order_by(ca_servers.c.name)
            return [CAServerRecord(**dict(r._mapping)) for r in conn.execute(stmt)]

        return self._read("list CA servers", body)

    # --- tokens and enrollment -----------------------------------------------
    def add_token(self, token: TokenRecord) -> None:
        """Store a new token (Conflict if the hash exists)."""

        def body(conn: sa.Connection) -> None:
            conn.execute(
                tokens.insert().values(
                    token_hash=token.token_hash,
                    host=token.host,
                    created_at=token.created_at,
                    expires_at=token.expires_at,
                    used_at=token.used_at,
                    created_by=token.created_by,
                    redeemed_key=token.redeemed_key,
                )
            )

        self._write("add token", body)

    def redeem_token(
        self,
        token_hash: str,
        now: dt.datetime,
        issue: Callable[[str], CertificateRecord],
        key: str = "",
    ) -> tuple[TokenRecord, CertificateRecord]:
        """Atomically spend a token and record the certificate ``issue(host_name)`` returns.

        See :meth:`tapproof.store.base.Store.redeem_token` (including the repeat by the
        same key). A used token is reported as ``USED`` even when it has also expired
        since. The host record gets its ``spiffe_id`` from the certificate.
        """

        def body(conn: sa.Connection) -> tuple[TokenRecord, CertificateRecord]:
            row = conn.execute(sa.select(tokens).where(tokens.c.token_hash == token_hash).with_for_update()).first()
            if row is None:
                raise EnrollmentRefused(TokenReason.UNKNOWN)
            token = _token(row)
            repeat = token.used_at is not None
            if repeat and not self._may_repeat(conn, token, key, now):
                revoked = conn.execute(sa.select(hosts.c.revoked_at).where(hosts.c.name == token.host)).scalar()
                reason = TokenReason.USED if revoked is None else TokenReason.HOST_REVOKED
                raise EnrollmentRefused(reason, f"host {token.host}")
            if now >= token.expires_at:
                raise EnrollmentRefused(TokenReason.EXPIRED, f"host {token.host}")
            host_row = conn.execute(
                sa.select(hosts.c.revoked_at).where(hosts.c.name == token.host).with_for_update()
            ).first()
            if host_row is not None and host_row.revoked_at is not None:
                raise EnrollmentRefused(TokenReason.HOST_REVOKED, f"host {token.host}")
            cert = issue(token.host)
            conn.execute(
                self._insert(hosts)
                .values(
                    name=token.host,
                    spiffe_id=cert.spiffe_id,
                    created_at=now,
                    enrolled_at=now,
                    revoke_reason="",
                    advertise="",
                )
                .on_conflict_do_update(
                    index_elements=["name"],
                    set_={"enrolled_at": now, "spiffe_id": cert.spiffe_id},
                )
            )
            conn.execute(certificates.insert().values(**_cert_values(cert)))
            if host_row is None:  # a new host: the registry lists it
                self._bump_registry(conn)
            if repeat:  # the same key again: a new certificate, the token's first use stands
                return token, cert
            conn.execute(tokens.update().where(tokens.c.token_hash == token_hash).values(used_at=now, redeemed_key=key))
            return dataclasses.replace(token, used_at=now, redeemed_key=key), cert

        return self._write("redeem token", body)

    @staticmethod
    def _may_repeat(conn: sa.Connection, token: TokenRecord, key: str, now: dt.datetime) -> bool:
        """A used token's redemption repeated: only by its key, soon, and if nothing revoked or replaced it."""
        used = token.used_at
        if used is None or not key or key != token.redeemed_key:
            return False
        if now >= token.expires_at or now >= used + REPEAT_WINDOW:
            return False
        revoked_since = sa.select(certificates.c.serial).where(
            certificates.c.host == token.host, certificates.c.issued_at >= used, certificates.c.revoked_at.is_not(None)
        )
        later_token = sa.select(tokens.c.token_hash).where(tokens.c.host == token.host, tokens.c.used_at > used)
        if conn.execute(revoked_since.limit(1)).first() is not None:
            return False
        return conn.execute(later_token.limit(1)).first() is None

    def list_tokens(self, *, include_used: bool = False) -> list[TokenRecord]:
        """Tokens, newest first (unused ones only unless ``include_used``)."""

        def body(conn: sa.Connection) -> list[TokenRecord]:
            stmt = sa.select(tokens).order_by(tokens.c.created_at.desc(), tokens.c.token_hash)
            if not include_used:
                stmt = stmt.where(tokens.c.used_at.is_(None))
            return [_token(r) for r in conn.execute(stmt)]

        return self._read("list tokens", body)

    # --- hosts ---------------------------------------------------------------
    def get_host(self, name: str) -> HostRecord:
        """Return a host (NotFound if absent)."""

        def body(conn: sa.Connection) -> HostRecord:
            row = conn.execute(sa.select(hosts).where(hosts.c.name == name)).first()
            if row is None:
                raise NotFound(f"no host {name!r}")
            return _host(row)

        return self._read("get host", body)

    def list_hosts(self) -> list[HostRecord]:
        """All hosts, by name."""

        return self._read("list hosts", self._all_hosts)

    @staticmethod
    def _all_hosts(conn: sa.Connection) -> list[HostRecord]:
        return [_host(r) for r in conn.execute(sa.select(hosts).order_by(hosts.c.name))]

    def revoked_hosts(self) -> list[str]:
        """Names of the revoked hosts, sorted (the partial index ``hosts_revoked`` holds only them)."""

        def body(conn: sa.Connection) -> list[str]:
            # sorted here: an ORDER BY name makes SQLite walk the primary key (every host) instead
            stmt = sa.select(hosts.c.name).where(hosts.c.revoked_at.is_not(None))
            return sorted(str(n) for n in conn.execute(stmt).scalars())

        return self._read("list revoked hosts", body)

    def update_host_seen(
        self, name: str, now: dt.datetime, advertise: str | None = None, bundle: str | None = None
    ) -> None:
        """Record that a host checked in (NotFound if the host was never enrolled)."""

        def body(conn: sa.Connection) -> None:
            values: dict[str, Any] = {"last_seen": now}
            if bundle is not None:
                values["bundle"] = bundle
            result = conn.execute(hosts.update().where(hosts.c.name == name).values(**values))
            if result.rowcount == 0:
                raise NotFound(f"no host {name!r}")
            if advertise is not None:  # the row is locked now: "changed" is decided against the latest value
                other = sa.and_(hosts.c.name == name, hosts.c.advertise != advertise)
                moved = conn.execute(hosts.update().where(other).values(advertise=advertise))
                if moved.rowcount:
                    self._bump_registry(conn)

        self._write("update host seen", body)

    def revoke_host(self, name: str, now: dt.datetime, reason: str) -> list[str]:
        """Revoke a host and all its unexpired certificates; return their serials, sorted.

        Idempotent: a second call keeps the first revocation time and reason
        (and certificates keep theirs) and returns the same serials.
        """

        def body(conn: sa.Connection) -> list[str]:
            row = conn.execute(sa.select(hosts.c.revoked_at).where(hosts.c.name == name).with_for_update()).first()
            if row is None:
                raise NotFound(f"no host {name!r}")
            if row.revoked_at is None:
                conn.execute(hosts.update().where(hosts.c.name == name).values(revoked_at=now, revoke_reason=reason))
                self._bump_registry(conn)
            live = sa.and_(certificates.c.host == name, certificates.c.not_after > now)
            conn.execute(certificates.update().where(live, certificates.c.revoked_at.is_(None)).values(revoked_at=now))
            stmt = sa.select(certificates.c.serial).where(live).order_by(certificates.c.serial)
            return [str(s) for s in conn.execute(stmt).scalars()]

        return self._write("revoke host", body)

    # --- certificates --------------------------------------------------------
    def record_certificate(self, cert: CertificateRecord) -> None:
        """Record an issued certificate (Conflict on a duplicate serial)."""

        def body(conn: sa.Connection) -> None:
            conn.execute(certificates.insert().values(**_cert_values(cert)))

        self._write("record certificate", body)

    def get_certificate(self, serial: str) -> CertificateRecord:
        """Return a certificate record (NotFound if absent)."""

        def body(conn: sa.Connection) -> CertificateRecord:
            row = conn.execute(sa.select(certificates).where(certificates.c.serial == serial)).first()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}")
            return _cert(row)

        return self._read("get certificate", body)

    def revoke_certificate(self, serial: str, now: dt.datetime) -> CertificateRecord:
        """Mark a certificate revoked (NotFound if absent); idempotent (keeps the first time)."""

        def body(conn: sa.Connection) -> CertificateRecord:
            conn.execute(
                certificates.update()
                .where(certificates.c.serial == serial, certificates.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = conn.execute(sa.select(certificates).where(certificates.c.serial == serial)).first()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}")
            return _cert(row)

        return self._write("revoke certificate", body)

    def revoked_serials(self, now: dt.datetime) -> list[str]:
        """Serials revoked and not yet expired at ``now``, sorted."""

        def body(conn: sa.Connection) -> list[str]:
            # partial index certificates_revoked (not_after, revoked only); sorted here, as an ORDER BY
            # serial makes SQLite walk the primary key (every certificate) instead
            stmt = sa.select(certificates.c.serial).where(
                certificates.c.revoked_at.is_not(None), certificates.c.not_after > now
            )
            return sorted(str(s) for s in conn.execute(stmt).scalars())

        return self._read("list revoked serials", body)

    def certificates_expiring(self, now: dt.datetime, within: dt.timedelta) -> list[CertificateRecord]:
        """Unrevoked certificates with ``now <= not_after < now + within``, soonest first."""

        def body(conn: sa.Connection) -> list[CertificateRecord]:
            stmt = (
                sa.select(certificates)
                .where(
                    certificates.c.revoked_at.is_(None),
                    certificates.c.not_after >= now,
                    certificates.c.not_after < now + within,
                )
                .order_by(certificates.c.not_after, certificates.c.serial)
            )
            return [_cert(r) for r in conn.execute(stmt)]

        return self._read("list expiring certificates", body)

    def unexpired_certificates(self, now: dt.datetime) -> list[CertificateRecord]:
        """Unrevoked certificates with ``not_after > now``, oldest issuance first."""

        def body(conn: sa.Connection) -> list[CertificateRecord]:
            stmt = (
                sa.select(certificates)
                .where(certificates.c.revoked_at.is_(None), certificates.c.not_after > now)
                .order_by(certificates.c.issued_at, certificates.c.serial)
            )
            return [_cert(r) for r in conn.execute(stmt)]

        return self._read("list unexpired certificates", body)

    def latest_certificate(self, host: str) -> CertificateRecord | None:
        """The certificate issued last to ``host`` (revoked or not, expired or not), or None."""

        def body(conn: sa.Connection) -> CertificateRecord | None:
            stmt = (
                sa.select(certificates)
                .where(certificates.c.host == host)
                .order_by(certificates.c.issued_at.desc(), certificates.c.not_after.desc())
                .limit(1)
            )
            row = conn.execute(stmt).first()
            return None if row is None else _cert(row)

        return self._read("latest certificate of a host", body)

    # --- services ------------------------------------------------------------
    def register_services(self, host: str, services_: Sequence[ServiceRecord]) -> None:
        """Replace the set of services ``host`` fronts with ``services_``.

        Every record must name ``host`` (ValueError otherwise: a caller bug);
        two records with one name are a Conflict.
        """
        wrong = [s.name for s in services_ if s.host != host]
        if wrong:
            raise ValueError(f"services {wrong} are not on host {host!r}")

        wanted = {(s.name, s.advertise) for s in services_}

        def body(conn: sa.Connection) -> None:
            # one host's registrations queue here (no row for an unknown host: nothing to order against)
            conn.execute(sa.select(hosts.c.name).where(hosts.c.name == host).with_for_update())
            have = conn.execute(sa.select(services.c.name, services.c.advertise).where(services.c.host == host)).all()
            if len(have) == len(services_) and {(r.name, r.advertise) for r in have} == wanted:
                return  # an agent re-registering what it had: no write, no registry bump
            conn.execute(services.delete().where(services.c.host == host))
            self._bump_registry(conn)
            if services_:
                conn.execute(
                    services.insert(),
                    [
                        {
                            "name": s.name,
                            "host": host,
                            "advertise": s.advertise,
                            "registered_at": s.registered_at,
                        }
                        for s in services_
                    ],
                )

        self._write("register services", body)

    def list_services(self) -> list[ServiceRecord]:
        """All services, by (name, host)."""

        return self._read("list services", self._all_services)

    @staticmethod
    def _all_services(conn: sa.Connection) -> list[ServiceRecord]:
        stmt = sa.select(services).order_by(services.c.name, services.c.host)
        return [
            ServiceRecord(name=r.name, host=r.host, advertise=r.advertise, registered_at=r.registered_at)
            for r in conn.execute(stmt)
        ]

    # --- registry version ----------------------------------------------------
    @staticmethod
    def _bump_registry(conn: sa.Connection) -> None:
        # Last lock a registry-changing write takes (after its host/token rows): held only until its commit.
        conn.execute(
            registry_state.update().where(registry_state.c.id == 1).values(version=registry_state.c.version + 1)
        )

    @staticmethod
    def _registry_version(conn: sa.Connection) -> RegistryVersion:
        row = conn.execute(
            sa.select(registry_state.c.version, registry_state.c.epoch).where(registry_state.c.id == 1)
        ).one()
        return RegistryVersion(int(row.version), str(row.epoch))

    def registry_version(self) -> RegistryVersion:
        """The registry's version (one primary-key read of a one-row table)."""
        return self._read("read registry version", self._registry_version)

    def registry_snapshot(self) -> RegistrySnapshot:
        """The version, all hosts and all services in one snapshot (REPEATABLE READ on PostgreSQL)."""

        def body(conn: sa.Connection) -> RegistrySnapshot:
            return RegistrySnapshot(self._registry_version(conn), self._all_hosts(conn), self._all_services(conn))

        return self._read("read registry", body, isolation="REPEATABLE READ")

    # --- policy --------------------------------------------------------------
    @staticmethod
    def _bump_policy(conn: sa.Connection) -> None:
        # First statement of every policy write: takes the row lock that orders them.
        conn.execute(policy_state.update().where(policy_state.c.id == 1).values(version=policy_state.c.version + 1))

    def add_policy_rule(self, rule: PolicyRuleRecord) -> PolicyRuleRecord:
        """Insert a rule; return it with its id. Bumps the policy version."""

        def body(conn: sa.Connection) -> PolicyRuleRecord:
            self._bump_policy(conn)
            result = conn.execute(
                policy_rules.insert().values(
                    action=rule.action,
                    source=rule.source,
                    service=rule.service,
                    ports=rule.ports,
                    created_at=rule.created_at,
                    comment=rule.comment,
                )
            )
            pk = result.inserted_primary_key
            if pk is None:  # pragma: no cover - both dialects return it
                raise StoreError("add policy rule: no id returned")
            return dataclasses.replace(rule, rule_id=int(pk[0]))

        return self._write("add policy rule", body)

    def remove_policy_rule(self, rule_id: int) -> None:
        """Delete a rule (NotFound if absent). Bumps the policy version."""

        def body(conn: sa.Connection) -> None:
            self._bump_policy(conn)
            result = conn.execute(policy_rules.delete().where(policy_rules.c.rule_id == rule_id))
            if result.rowcount == 0:
                raise NotFound(f"no policy rule {rule_id}")

        self._write("remove policy rule", body)

    def list_policy_rules(self) -> tuple[int, list[PolicyRuleRecord]]:
        """Return (policy version, rules in id order) read in one snapshot."""

        def body(conn: sa.Connection) -> tuple[int, list[PolicyRuleRecord]]:
            version = conn.execute(sa.select(policy_state.c.version).where(policy_state.c.id == 1)).scalar_one()
            rows = conn.execute(sa.select(policy_rules).order_by(policy_rules.c.rule_id))
            return int(version), [_rule(r) for r in rows]

        return self._read("list policy rules", body, isolation="REPEATABLE READ")

    # --- audit log -----------------------------------------------------------
    def append_audit(self, ts: dt.datetime, actor: str, action: str, detail: dict[str, Any]) -> int:
        """Append an entry; return its id (``detail`` must be JSON-serialisable: TypeError)."""
        json.dumps(detail)  # fail fast, before any lock is taken

        def body(conn: sa.Connection) -> int:
            if self._dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_AUDIT_LOCK_KEY)))
            result = conn.execute(audit_log.insert().values(ts=ts, actor=actor, action=action, detail=detail))
            pk = result.inserted_primary_key
            if pk is None:  # pragma: no cover - both dialects return it
                raise StoreError("append audit: no id returned")
            return int(pk[0])

        return self._write("append audit entry", body)

    def list_audit(self, *, since_id: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Entries with id > since_id, oldest first, at most ``limit``."""

        def body(conn: sa.Connection) -> list[AuditEntry]:
            stmt = (
                sa.select(audit_log)
                .where(audit_log.c.entry_id > since_id)
                .order_by(audit_log.c.entry_id)
                .limit(max(0, limit))
            )
            return [
                AuditEntry(
                    entry_id=int(r.entry_id),
                    ts=r.ts,
                    actor=r.actor,
                    action=r.action,
                    detail=dict(r.detail),
                )
                for r in conn.execute(stmt)
            ]

        return self._read("list audit log", body)


# --- opening and migrating ---------------------------------------------------


def _check_version(found: int, url: str, *, migrate: bool) -> None:
    latest = migrations.LATEST
    if found > latest:
        raise SchemaMismatch(
            f"database {url} has schema version {found}, newer than this tapproof knows "
            f"({latest}): upgrade tapproof; `tapproof server migrate` cannot downgrade"
        )
    if found < latest and not migrate:
        state = "is empty" if found == 0 else f"has schema version {found}"
        raise SchemaMismatch(
            f"database {url} {state}, this tapproof needs version {latest}: run `tapproof server migrate` first"
        )


def open_store(url: str, *, migrate: bool = False) -> SQLStore:
    """Open the store at ``url`` (``sqlite:///PATH`` or ``postgresql://...``).

    Checks the schema version: newer than this code knows, or older/empty
    without ``migrate=True``, raises :class:`~tapproof.errors.SchemaMismatch`;
    with ``migrate=True`` the missing migrations are applied first. A database
    that cannot be reached or read raises
    :class:`~tapproof.errors.StoreUnavailable`; a bad URL raises
    :class:`~tapproof.errors.ConfigError`.
    """
    parsed = parse_url(url)
    sqlite_file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not migrate and sqlite_file:
        try:
            exists = Path(sqlite_file).exists()
        except OSError as exc:
            raise StoreUnavailable(f"open store: cannot use {redact(parsed)}: {exc}") from exc
        if not exists:
            _check_version(0, redact(parsed), migrate=False)  # refuse without leaving a file behind
    engine = make_engine(parsed)
    try:
        if migrate:
            _migrate_engine(engine)
        else:
            found = run_tx(engine, migrations.current_version, write=False, what="open store")
            _check_version(found, redact(parsed), migrate=False)
    except BaseException:
        engine.dispose()
        raise
    return SQLStore(engine)


def _migrate_engine(engine: sa.Engine) -> tuple[int, int]:
    url = redact(engine.url)

    def body(conn: sa.Connection) -> tuple[int, int]:
        if conn.dialect.name == "postgresql":
            # Two servers migrating at once: the second waits, then finds nothing to do.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_AUDIT_LOCK_KEY + 1)))
        found = migrations.current_version(conn)
        _check_version(found, url, migrate=True)
        return migrations.apply(conn, _now())

    return run_tx(engine, body, write=True, what="migrate")


def migrate(url: str) -> tuple[int, int]:
    """Bring the database at ``url`` to the latest schema; return (from, to) versions.

    Refuses (SchemaMismatch) a database newer than this code knows.
    """
    engine = make_engine(parse_url(url))
    try:
        return _migrate_engine(engine)
    finally:
        engine.dispose()


__all__ = ["SQLStore", "migrate", "open_store"]
