"""The tables the queries of :mod:`tapproof.store.sql` use (the CURRENT schema).

The DDL that creates them lives in :mod:`tapproof.store.migrations`, one
frozen function per schema version. When a migration changes a table, change
it here too; the conformance suite (``tests/store``) runs every query against
a database built by the migrations, so the two cannot drift silently.

Times are :class:`UTCDateTime`: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL,
fixed-width ISO-8601 strings (``2026-01-01T12:00:00.000000Z``) on SQLite, so
comparisons and ``ORDER BY`` on the text are chronological there too. Either
way Python sees aware UTC datetimes, and naive datetimes are refused.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

_SQLITE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """An aware UTC datetime, stored natively on PostgreSQL and as sortable text on SQLite."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """Text on SQLite, ``timestamptz`` elsewhere."""
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(32))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        """Refuse naive datetimes; convert to UTC (and to text on SQLite)."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store takes aware UTC datetimes")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.strftime(_SQLITE_FORMAT)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, str):
            # fromisoformat is ~30x faster than strptime (it dominated listing 10,000 hosts); the text is ours
            parsed = dt.datetime.fromisoformat(value)
            return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)
        if not isinstance(value, dt.datetime):  # pragma: no cover - a driver surprise
            raise TypeError(f"unexpected timestamp value {value!r}")
        if value.tzinfo is None:  # pragma: no cover - timestamptz is always aware
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

metadata = sa.MetaData()

schema_versions = sa.Table(
    "tapproof_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

trust_roots = sa.Table(
    "trust_roots",
    metadata,
    sa.Column("fingerprint", sa.String(64), primary_key=True),
    sa.Column("cert_pem", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_hash", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("used_at", UTCDateTime, nullable=True),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("redeemed_key", sa.String(64), nullable=False, server_default=""),  # v3
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("spiffe_id", sa.String(2048), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("enrolled_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("revoke_reason", sa.Text, nullable=False),
    sa.Column("advertise", sa.String(300), nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=True),
    sa.Column("bundle", sa.Text, nullable=False, server_default=""),  # v2: root fingerprints the host holds
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("spiffe_id", sa.String(2048), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("not_before", UTCDateTime, nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("issued_at", UTCDateTime, nullable=False),
    sa.Column("issuer", sa.String(2048), nullable=False),
    sa.Column("host", sa.String(255), nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("root", sa.String(64), nullable=False, server_default=""),  # v2: root the chain ends at
)

services = sa.Table(
    "services",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("advertise", sa.String(300), nullable=False),
    sa.Column("registered_at", UTCDateTime, nullable=False),
)

policy_state = sa.Table(
    "policy_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)

registry_state = sa.Table(  # v4: one row (id 1); its version moves with the registry's content
    "registry_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("epoch", sa.String(32), nullable=False),
)

policy_rules = sa.Table(
    "policy_rules",
    metadata,
    sa.Column("rule_id", sa.Integer, primary_key=True),
    sa.Column("action", sa.String(8), nullable=False),
    sa.Column("source", sa.String(2048), nullable=False),
    sa.Column("service", sa.String(255), nullable=False),
    sa.Column("ports", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=True),
    sa.Column("comment", sa.Text, nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("entry_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("ts", UTCDateTime, nullable=False),
    sa.Column("actor", sa.String(2048), nullable=False),
    sa.Column("action", sa.String(255), nullable=False),
    sa.Column("detail", JSONDoc, nullable=False),
)

# --- v2: CA state shared by the servers of one database ------------------------

ca_intermediates = sa.Table(
    "ca_intermediates",
    metadata,
    sa.Column("fingerprint", sa.String(64), primary_key=True),
    sa.Column("server", sa.String(255), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("root", sa.String(64), nullable=False),
    sa.Column("cert_pem", sa.Text, nullable=False),
    sa.Column("not_before", UTCDateTime, nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

ca_requests = sa.Table(
    "ca_requests",
    metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("server", sa.String(255), nullable=False),
    sa.Column("csr_pem", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

ca_servers = sa.Table(
    "ca_servers",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("intermediate", sa.String(64), nullable=False),
    sa.Column("root", sa.String(64), nullable=False),
    sa.Column("bundle", sa.Text, nullable=False),
    sa.Column("seen_at", UTCDateTime, nullable=False),
)
