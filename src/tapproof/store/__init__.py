"""Storage: one :class:`~tapproof.store.base.Store` interface, SQLite and PostgreSQL behind it."""

from tapproof.store.base import (
    AuditEntry,
    CertificateRecord,
    HostRecord,
    PolicyRuleRecord,
    ServiceRecord,
    Store,
    TokenRecord,
    TrustRootRecord,
)

__all__ = [
    "AuditEntry",
    "CertificateRecord",
    "HostRecord",
    "PolicyRuleRecord",
    "ServiceRecord",
    "Store",
    "TokenRecord",
    "TrustRootRecord",
]
