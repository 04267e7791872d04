"""Admin credentials: the CLI on the server host acts as ``spiffe://TD/tapproof/admin``.

``server init`` makes the CA; admin commands (``token create``, ``policy``,
``revoke``, ``status``) then issue themselves a short-lived admin certificate
with the intermediate key in ``D/ca`` (so whoever can read the data dir is
admin, as with the CA keys themselves), keep it in ``D/admin`` (key 0600),
record it in the store and the audit log, and call the running server's API
over mutual TLS like any other client.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from tapproof import identity
from tapproof.clock import Clock
from tapproof.control import config as server_config
from tapproof.control.client import APIClient
from tapproof.errors import ConfigError
from tapproof.fsutil import ensure_private_dir, write_atomic
from tapproof.pki import certs, cluster
from tapproof.store import CertificateRecord, open_store
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle

ADMIN_LIFETIME = dt.timedelta(hours=1)


def run_file(data_dir: Path) -> Path:
    """``D/run/address``: where the running server listens (written by ``server run``)."""
    return Path(data_dir) / "run" / "address.json"


def write_run_file(data_dir: Path, addresses: list[str], pid: int) -> None:
    """Record the running server's addresses for local admin commands."""
    ensure_private_dir(Path(data_dir) / "run")
    write_atomic(run_file(data_dir), json.dumps({"addresses": addresses, "pid": pid}).encode(), mode=0o600)


def server_addresses(data_dir: Path, cfg: server_config.ServerConfig) -> list[str]:
    """The running server's addresses, else the configured ones."""
    try:
        data = json.loads(run_file(data_dir).read_text())
        addrs = [str(a) for a in data["addresses"]]
        if addrs:
            return addrs
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return list(cfg.advertise) or [cfg.listen]


def admin_credentials(data_dir: Path, clock: Clock) -> Credentials:
    """Load ``D/admin`` credentials, issuing fresh ones when missing or past half-life."""
    cfg = server_config.load(data_dir)
    adir = Path(data_dir) / "admin"
    key_path, cert_path = adir / "admin.key", adir / "admin.crt"
    now = clock.now()
    store = open_store(cfg.db)
    try:
        ca = cluster.select(data_dir, store, cfg.trust_domain, cfg.name, now).ca
        try:
            creds = Credentials.load(key_path, cert_path)
            remaining = creds.not_after - now
            # reuse until half-life, unless a rotation moved this server to another intermediate or root
            if remaining > (creds.not_after - creds.not_before) / 2 and creds.chain[1:] == (ca.intermediate,):
                return creds
        except ConfigError:
            pass
        sid = identity.admin_id(cfg.trust_domain)
        creds = ca.credentials_for(sid, now, ADMIN_LIFETIME)
        leaf = creds.leaf
        store.record_certificate(
            CertificateRecord(
                certs.serial_hex(leaf),
                str(sid),
                "admin",
                leaf.not_valid_before_utc,
                leaf.not_valid_after_utc,
                now,
                "local-cli",
                root=ca.root_fingerprint,
            )
        )
        store.append_audit(now, "local-cli", "admin-credential", {"serial": certs.serial_hex(leaf)})
    finally:
        store.close()
    ensure_private_dir(adir)
    creds.save(key_path, cert_path)
    return creds


def trust_bundle(cfg: server_config.ServerConfig) -> TrustBundle:
    """Every root of the shared bundle (the server's certificate may chain to any during a rotation)."""
    store = open_store(cfg.db)
    try:
        return TrustBundle(tuple(cluster.root_certs(store).values()))
    finally:
        store.close()


def admin_client(data_dir: Path, clock: Clock, *, server: str | None = None) -> APIClient:
    """An API client authenticated as the admin, for the server in ``data_dir``."""
    cfg = server_config.load(data_dir)
    creds = admin_credentials(data_dir, clock)
    bundle = trust_bundle(cfg)
    servers = [server] if server else server_addresses(data_dir, cfg)
    return APIClient(servers, cfg.trust_domain, lambda: context.client_context(creds, bundle), now=clock.now)
