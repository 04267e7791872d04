"""``tapproof server run``: wire config, store, CA, credentials, API server and metrics together."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from prometheus_client import Gauge, start_http_server

from tapproof import identity
from tapproof.clock import Clock
from tapproof.control import admin, camaint, tlsctx
from tapproof.control import config as server_config
from tapproof.control.httpserver import APIServer
from tapproof.control.service import ControlPlane, address_list
from tapproof.errors import ConfigError, StoreError, TransportError
from tapproof.listener import bind
from tapproof.logs import log_event
from tapproof.pki import certs, cluster
from tapproof.pki.expiry import parse_warn
from tapproof.store import CertificateRecord, open_store
from tapproof.tls import unsafe
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.units import parse_hostport

log = logging.getLogger(__name__)
SERVER_CERT_LIFETIME = dt.timedelta(hours=24)
UNSAFE_CLASSICAL_GROUPS = Gauge(
    "tapproof_server_unsafe_classical_groups", "1 when --unsafe-classical-groups lets classical key exchange in"
)


class ServerCredentials:
    """The server's own TLS identity, renewed at half-life; contexts are rebuilt on renewal."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._lock = threading.Lock()
        self._ctx: SSL.Context | None = None
        self._creds: Credentials | None = None
        self.refresh()

    def refresh(self) -> None:
        """Issue a new server certificate (new key) and build a new context."""
        cp = self.cp
        now = cp.clock.now()
        sid = identity.server_id(cp.td)
        creds = cp.ca.credentials_for(sid, now, SERVER_CERT_LIFETIME)
        # Send the root too: a new agent pins the root by fingerprint before it has a bundle.
        full = Credentials(creds.key, (*creds.chain, cp.ca.root))
        leaf = creds.leaf
        cp.store.record_certificate(
            CertificateRecord(
                certs.serial_hex(leaf),
                str(sid),
                "server",
                leaf.not_valid_before_utc,
                leaf.not_valid_after_utc,
                now,
                cp.config.name,
                root=cp.ca.root_fingerprint,
            )
        )
        bundle = TrustBundle.from_pem(cp.bundle_pem().encode())
        ctx = tlsctx.api_server_context(
            full,
            bundle,
            unsafe_classical_groups=cp.config.unsafe_classical_groups,
            renew_grace=cp.config.renew_grace > dt.timedelta(0),
        )
        with self._lock:
            self._creds, self._ctx = full, ctx
        cp.server_leaf = leaf
        log_event(log, "server-credentials", serial=certs.serial_hex(leaf), not_after=leaf.not_valid_after_utc)

    def context(self) -> SSL.Context:
        """The current context (new connections use it; live ones keep theirs)."""
        with self._lock:
            assert self._ctx is not None  # noqa: S101 - set in __init__
            return self._ctx

    @property
    def leaf(self) -> Any:
        """The current server certificate."""
        with self._lock:
            assert self._creds is not None  # noqa: S101
            return self._creds.leaf

    def due(self) -> bool:
        """True past half-life."""
        with self._lock:
            assert self._creds is not None  # noqa: S101
            c = self._creds
        return c.renewal_due(self.cp.clock.now(), 0.5)


def run(data_dir: Path, overrides: dict[str, Any], clock: Clock) -> int:
    """Run the server until SIGTERM/SIGINT."""
    cfg = server_config.load(data_dir, overrides)
    store = open_store(cfg.db)
    ca = cluster.select(data_dir, store, cfg.trust_domain, cfg.name, clock.now()).ca
    host, port = parse_hostport(cfg.listen, what="--listen", allow_zero=True)
    sock = bind(host, port, what="--listen")
    addresses = address_list(cfg.listen, int(sock.getsockname()[1]), cfg.advertise)
    cp = ControlPlane(store, ca, cfg, clock, addresses)
    creds = ServerCredentials(cp)
    server = APIServer(cp, creds.context, sock)
    if cfg.metrics:
        mhost, mport = parse_hostport(cfg.metrics, what="--metrics", allow_zero=True)
        try:
            start_http_server(mport, addr=mhost)
        except OSError as exc:
            sock.close()
            raise TransportError(f"--metrics: cannot bind {cfg.metrics}: {exc.strerror}") from exc
    admin.write_run_file(data_dir, addresses, os.getpid())
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log_event(log, "server-stopping", signal=signal.Signals(signum).name)
        stop.set()  # the main thread stops the server (no blocking work in a signal handler)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    cp.announce()

    def maintain() -> None:
        while not stop.wait(30.0):
            try:
                cp.announce()
            except StoreError as exc:  # the database is down: the store logged it; announce next round
                log_event(log, "server-announce-failed", level=logging.WARNING, detail=str(exc))
            try:
                if creds.due():
                    creds.refresh()
            except Exception:
                log.exception("server-credentials-refresh-failed", extra={"event": "server-credentials-failed"})

    threading.Thread(target=maintain, daemon=True, name="maintain").start()
    ca_maint = camaint.CAMaintainer(cp, creds, data_dir, parse_warn(cfg.expiry_warn))
    camaint.run_round(ca_maint)

    def maintain_ca() -> None:
        while not stop.wait(camaint.CA_POLL):
            camaint.run_round(ca_maint)

    threading.Thread(target=maintain_ca, daemon=True, name="maintain-ca").start()
    UNSAFE_CLASSICAL_GROUPS.set(1 if cfg.unsafe_classical_groups else 0)
    if cfg.unsafe_classical_groups:
        log_event(log, "unsafe-classical-groups", level=logging.WARNING, warning=unsafe.WARNING)
    log_event(
        log,
        "server-started",
        addresses=addresses,
        trust_domain=cfg.trust_domain,
        db=cfg.db.split("@")[-1],
        fingerprint=ca.root_fingerprint,
    )
    server.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop.set()
        server.stop()
        store.close()
        with contextlib.suppress(OSError):
            admin.run_file(data_dir).unlink()
    return 0


def check_data_dir(data_dir: Path) -> Path:
    """Refuse a data dir that is not a directory."""
    p = Path(data_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--data-dir: {p} is not a directory")
    return p
