"""Test PKI: a CA in a temp dir and leaves made with it (real keys, real certificates)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tapproof import identity
from tapproof.pki.ca import LocalCA, init_ca
from tapproof.tls.credentials import Credentials

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def make_ca(tmp: Path, td: str = "example.org", now: dt.datetime | None = None) -> LocalCA:
    """A fresh root + intermediate in ``tmp``."""
    return init_ca(tmp, td, now or dt.datetime.now(dt.UTC))


def host_creds(ca: LocalCA, name: str, now: dt.datetime | None = None, hours: float = 1.0) -> Credentials:
    """Credentials for ``spiffe://TD/host/NAME``."""
    return ca.credentials_for(
        identity.host_id(ca.trust_domain, name), now or dt.datetime.now(dt.UTC), dt.timedelta(hours=hours)
    )
