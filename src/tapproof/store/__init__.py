"""Storage: one :class:`~tapproof.store.base.Store` interface, SQLite and PostgreSQL behind it.

Open a store with :func:`open_store` (``sqlite:///PATH`` or
``postgresql://USER@HOST:PORT/DB``); bring a database to the current schema
with :func:`migrate` (what ``tapproof server migrate`` runs).
"""

from tapproof.store.base import (
    AuditEntry,
    CARequestRecord,
    CAServerRecord,
    CertificateRecord,
    HostRecord,
    IntermediateRecord,
    PolicyRuleRecord,
    RegistrySnapshot,
    RegistryVersion,
    ServiceRecord,
    Store,
    TokenRecord,
    TrustRootRecord,
)
from tapproof.store.migrations import LATEST as SCHEMA_VERSION
from tapproof.store.sql import SQLStore, migrate, open_store

__all__ = [
    "SCHEMA_VERSION",
    "AuditEntry",
    "CARequestRecord",
    "CAServerRecord",
    "CertificateRecord",
    "HostRecord",
    "IntermediateRecord",
    "PolicyRuleRecord",
    "RegistrySnapshot",
    "RegistryVersion",
    "SQLStore",
    "ServiceRecord",
    "Store",
    "TokenRecord",
    "TrustRootRecord",
    "migrate",
    "open_store",
]
