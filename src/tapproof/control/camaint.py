"""A running server's CA upkeep, one round every few seconds (``CA_POLL``), off the request path.

Each round reads the CA state from the store (:func:`tapproof.pki.cluster.select`):

* the bundle or the active root changed (a rotation step run anywhere): a
  new server certificate under the active root and a new TLS context that
  trusts the whole bundle; live connections keep theirs;
* the server certificate is past half its life: the same;
* this server's intermediate is past half its life: with the active root's
  key in the data dir, a new key is certified at once (under every active or
  prepared root whose key is here); without it, a request is queued for
  ``tapproof server ca sign-intermediate`` and a warning is logged, shown in
  ``server status`` and in ``tapproof_server_ca_rotation_pending``;
* a heartbeat (``ca_servers``) says which chain and bundle this server uses,
  which ``server ca rotate activate|retire`` check before moving on;
* ``tapproof_server_ca_expiry_seconds{kind,cert}`` and
  ``tapproof_server_ca_expiry_warning{kind,cert}`` for the leaf, the
  intermediate and every root.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Gauge

from tapproof.control.service import ControlPlane
from tapproof.errors import TapproofError
from tapproof.logs import log_event
from tapproof.pki import certs, cluster, expiry, keys, rotation
from tapproof.store.base import CAServerRecord

log = logging.getLogger(__name__)

CA_POLL = 2.0
EXPIRY = Gauge("tapproof_server_ca_expiry_seconds", "Seconds until expiry", ["kind", "cert"])
WARNING = Gauge("tapproof_server_ca_expiry_warning", "1 when the expiry warning threshold is crossed", ["kind", "cert"])
ROTATION_PENDING = Gauge(
    "tapproof_server_ca_rotation_pending", "1 while this server's new intermediate waits for the offline root key"
)


class Credentials(Protocol):
    """What :class:`tapproof.control.runner.ServerCredentials` offers."""

    def refresh(self) -> None:
        """Issue a new server certificate and context."""

    def due(self) -> bool:
        """Past half-life."""

    @property
    def leaf(self) -> Any:
        """The current server certificate."""


class CAMaintainer:
    """One server's CA upkeep; :meth:`round` is called by the runner's maintenance thread."""

    def __init__(self, cp: ControlPlane, creds: Credentials, data_dir: Path, warn: expiry.WarnPolicy) -> None:
        self.cp = cp
        self.creds = creds
        self.data_dir = Path(data_dir)
        self.warn = warn
        self._chain = (cp.ca.intermediate, cp.ca.root)
        self._bundle = tuple(cp.bundle_fingerprints())
        self._last_warn = -1e9
        self.pending = False

    def round(self) -> None:
        """Reload CA state, refresh what changed, rotate the intermediate when due, heartbeat."""
        cp = self.cp
        now = cp.clock.now()
        sel = cluster.select(self.data_dir, cp.store, cp.td, cp.config.name, now)
        bundle = tuple(sel.roots)
        chain = (sel.ca.intermediate, sel.ca.root)
        if chain != self._chain or bundle != self._bundle or self.creds.due():
            why = "chain" if chain != self._chain else "bundle" if bundle != self._bundle else "half-life"
            cp.ca = sel.ca
            self.creds.refresh()
            self._chain, self._bundle = chain, bundle
            log_event(log, "ca-reloaded", reason=why, root=certs.fingerprint(sel.ca.root)[:16], bundle=len(bundle))
        self._intermediate(sel, now)
        cp.store.heartbeat_ca_server(
            CAServerRecord(
                cp.config.name, sel.intermediate.fingerprint, certs.fingerprint(sel.ca.root), ",".join(bundle), now
            )
        )
        self._metrics(sel, now)

    def _intermediate(self, sel: cluster.Selection, now: dt.datetime) -> None:
        cp, inter = self.cp, sel.intermediate
        threshold = self.warn.for_kind("intermediate")
        root_keys = cluster.find_root_keys(self.data_dir, sel.roots)
        # half-life and warning counted from issuance, not from the backdated not_before (which
        # would put a short-lived intermediate past half its life the moment it is signed)
        issued = max(inter.not_before, min(inter.created_at, inter.not_after))
        plan = rotation.intermediate_action(
            now=now,
            not_before=issued,
            not_after=inter.not_after,
            root_key_here=sel.active in root_keys,
            request_pending=sel.request_pending,
            warn_reached=threshold.reached(issued, inter.not_after, now),
        )
        if plan.action in ("sign-now", "request"):
            cluster.request(self.data_dir, cp.store, cp.config.name, now, _algorithm(sel))
        if plan.action == "sign-now":
            done = cluster.sign_requests(cp.store, cp.td, root_keys, now, cp.config.intermediate_ttl)
            log_event(log, "intermediate-rotated", server=cp.config.name, certificates=len(done))
        elif plan.action == "request":
            log_event(
                log,
                "intermediate-rotation-pending",
                level=logging.WARNING,
                server=cp.config.name,
                not_after=inter.not_after,
                hint="the root key is offline: run `tapproof server ca sign-intermediate` where it is",
            )
        self.pending = plan.action in ("request", "wait")
        ROTATION_PENDING.set(1 if self.pending else 0)
        mono = time.monotonic()
        if plan.warn and mono - self._last_warn >= 60.0:
            self._last_warn = mono
            log_event(
                log,
                "intermediate-expiring",
                level=logging.WARNING,
                server=cp.config.name,
                not_after=inter.not_after,
                seconds_left=int((inter.not_after - now).total_seconds()),
                rotation_pending=self.pending,
            )

    def _metrics(self, sel: cluster.Selection, now: dt.datetime) -> None:
        items = [expiry.of_cert("leaf", self.creds.leaf), expiry.of_cert("intermediate", sel.ca.intermediate)]
        items += [expiry.of_cert("root", r) for r in sel.roots.values()]
        EXPIRY.clear()
        WARNING.clear()
        for e in items:
            EXPIRY.labels(e.kind, e.name).set(e.seconds_left(now))
            WARNING.labels(e.kind, e.name).set(
                1 if self.warn.for_kind(e.kind).reached(e.not_before, e.not_after, now) else 0
            )


def _algorithm(sel: cluster.Selection) -> keys.Algorithm:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return "ed25519" if isinstance(sel.ca.intermediate_key, ed25519.Ed25519PrivateKey) else "ecdsa-p256"


def run_round(maint: CAMaintainer) -> None:
    """One round; errors are logged (the database may be down), never raised."""
    try:
        maint.round()
    except TapproofError as exc:
        log_event(log, "ca-maintenance-failed", level=logging.WARNING, detail=str(exc))
    except Exception:
        log.exception("ca-maintenance-crashed", extra={"event": "ca-maintenance-crashed"})
