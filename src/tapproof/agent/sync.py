"""The sync loop: the agent's only conversation with the control plane, off the data path.

Every ``sync_interval`` (default 5 s) it registers the advertised address and
services (at start, after a reload, and every :data:`REGISTER_EVERY`), polls
the policy (``If-None-Match``), the revocations, the registry and the trust
bundle, and renews the certificate once ``renew_fraction`` of its lifetime has
passed. Nothing here blocks a tunnel: the data plane reads the caches this
loop fills.

* Renewal failure keeps the current certificate and retries with exponential
  backoff (1 s doubling, capped at 5% of the lifetime, at most 60 s).
* A new certificate or trust bundle is swapped in atomically
  (:class:`~tapproof.agent.credstore.CredStore`); live tunnels keep theirs.
* A revocation stops the live tunnels of the revoked peer at once.
* Control plane unreachable (or answering 503): keep serving on the current
  certificate and the cached policy/registry; ``tapproof_agent_control_plane_up``
  is 0 and one line is logged per transition; polls back off (:func:`poll_wait`).
  Every poll interval carries +-10 % jitter, so a fleet does not poll in step.
* ``tapproof_agent_certificate_expiry_seconds`` is updated every round; a
  warning is logged (at most every 30 s) once the leaf threshold of
  ``--expiry-warn`` is crossed (default: a quarter of the lifetime left),
  an error once it has expired.
* Root rotation (docs/rotation.md): ``/v1/bundle`` names the ``active`` root.
  A new bundle is reported back at once (``bundle`` in the registration), so
  ``server ca rotate activate`` knows every agent holds the next root; a
  chain that ends at another root than the active one is renewed early,
  after a random delay of up to ``min(60 s, lifetime/10)`` (no thundering
  herd), so ``rotate retire`` need not wait for leaves to expire.
* ``tapproof_agent_ca_expiry_seconds{kind,cert}`` and
  ``tapproof_agent_ca_expiry_warning{kind,cert}``: leaf, intermediate(s) and
  every root of the bundle, warning thresholds from ``--expiry-warn`` / key
  ``expiry_warn`` / ``TAPPROOF_EXPIRY_WARN`` (as the server's; default 25%).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from tapproof.agent import renew as renewal
from tapproof.agent.metrics import CA_EXPIRY, CA_WARNING, CERT_EXPIRY, CONTROL_PLANE_UP, RENEWALS
from tapproof.agent.policycache import parse_policy
from tapproof.agent.runtime import Runtime
from tapproof.agent.state import load_identity, save_bundle
from tapproof.control.client import APIClient
from tapproof.errors import APIError, ConfigError, PKIError, TapproofError, TransportError
from tapproof.fsutil import write_atomic
from tapproof.logs import log_event
from tapproof.pki import expiry
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.units import format_hostport, parse_hostport

log = logging.getLogger(__name__)

__all__ = ["REGISTER_EVERY", "SyncLoop", "poll_wait"]

MAX_SERVERS = 16
"""At most this many control-plane addresses are kept from the server's list."""

REGISTER_EVERY = 60.0
"""Seconds between re-registrations (the server also learns liveness from them)."""


POLL_BACKOFF_MAX = 30.0
"""While no server answers, polls back off (doubling) to at most this, or 8 sync intervals if that is less."""


def poll_wait(interval: float, down_rounds: int) -> float:
    """Seconds to the next poll: the interval, doubled per failed round up to the cap, with +-10 % jitter.

    The jitter spreads a fleet's polls (and its return after an outage) over time.
    """
    cap = max(interval, min(POLL_BACKOFF_MAX, 8 * interval))
    base = min(cap, interval * 2.0 ** min(down_rounds, 10))
    return base * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not a secret


class SyncLoop:
    """Keeps credentials, policy, revocations, registry and bundle current."""

    def __init__(self, rt: Runtime, *, api_timeout: float = 5.0) -> None:
        self.rt = rt
        ident = load_identity(rt.paths)
        self.client = APIClient(ident.servers, rt.trust_domain, rt.creds.client_context, timeout=api_timeout)
        self._etags: dict[str, str] = {}  # path -> ETag of the last applied answer
        if rt.policy.policy is not None and rt.policy.policy.etag:  # the cached policy: a 304 after a restart
            self._etags["/v1/policy"] = rt.policy.policy.etag
        self._registered_at = -REGISTER_EVERY
        self._register_needed = True
        self._next_renew_try = 0.0
        self._backoff = 0.0
        self._down_rounds = 0  # consecutive rounds without an answer: the poll interval backs off
        self._last_warn = 0.0
        self._was_up: bool | None = None
        self._active = ""  # the root the server issues under (from /v1/bundle)
        self._early_at = 0.0  # monotonic time of a pending early renewal (chain to a non-active root)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sync", daemon=True)
        CONTROL_PLANE_UP.set(0)

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread."""
        self._thread.start()

    def poke(self, *, register: bool = False) -> None:
        """Run a round now (after a config reload: ``register=True``)."""
        if register:
            self._register_needed = True
        self._wake.set()

    def _loop(self) -> None:
        rt = self.rt
        while not rt.stopping.is_set():
            try:
                self.sync_once()
            except Exception:  # never let a bug stop renewals; logged with its traceback
                log.exception("sync-round-crashed", extra={"event": "sync-round-crashed"})
            wait = poll_wait(rt.config.sync_interval, self._down_rounds)
            if self._next_renew_try:
                wait = max(0.05, min(wait, self._next_renew_try - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()

    # --- one round -------------------------------------------------------------------
    def sync_once(self) -> None:
        """One round: poll, maybe register, maybe renew, update the expiry metric."""
        self.client.mark = self.rt.mark  # set when transparent mode starts, maybe after this loop was built
        with self.client.session():  # one keep-alive connection for the round's calls, not one handshake each
            try:
                self._poll()
                self._set_up(True, None)
            except (TransportError, APIError, PKIError, ConfigError) as exc:
                self._set_up(False, exc)
            self._maybe_renew()
        self._expiry()

    def _poll(self) -> None:
        rt = self.rt
        now = time.monotonic()
        if self._register_needed or now - self._registered_at >= REGISTER_EVERY:
            self._register(now)
        self._if_changed("/v1/policy", self._policy)
        self._if_changed("/v1/revocations", lambda body, _tag: self._revocations(body))
        self._if_changed("/v1/registry", lambda body, _tag: self._registry(body))
        self._if_changed("/v1/bundle", lambda body, _tag: self._bundle(body))
        rt.last_sync = rt.now()

    def _if_changed(self, path: str, apply: Callable[[Any, str], None]) -> None:
        """GET ``path`` with the ETag of its last answer; ``apply(body, etag)`` a new one (a 304: nothing changed).

        The tag is kept only once ``apply`` returned, so a body that failed to apply (it raised)
        is fetched in full again next round.
        """
        tag = self._etags.get(path, "")
        status, rh, body = self.client.call("GET", path, None, [("If-None-Match", tag)] if tag else [])
        if status == 304:
            return
        self._etags.pop(path, None)
        new_tag = rh.get("etag", "")
        apply(body, new_tag)
        if new_tag:
            self._etags[path] = new_tag

    def _policy(self, body: Any, etag: str) -> None:
        snap = parse_policy(body, etag)
        if self.rt.policy.set_policy(snap):
            log_event(log, "policy-updated", version=snap.version, rules=len(snap.rules), default=snap.default)

    def _revocations(self, body: Any) -> None:
        rt = self.rt
        new_serials, new_hosts = rt.policy.set_revocations(body)
        if new_serials or new_hosts:
            closed = rt.tunnels.close_revoked(rt.policy.revoked_serials, rt.policy.revoked_hosts)
            log_event(
                log,
                "revocations-updated",
                level=logging.WARNING,
                new_serials=sorted(new_serials),
                new_hosts=sorted(new_hosts),
                tunnels_closed=len(closed),
            )

    def _registry(self, body: Any) -> None:
        # a changed registry (MBs at fleet scale) takes a while to apply: do not hold a server worker
        # meanwhile (after a change, every agent of the fleet is here at once)
        self.client.reset()
        if self.rt.registry.update(body):
            log_event(log, "registry-updated", hosts=len(self.rt.registry.snapshot()["hosts"]))

    def _register(self, now: float) -> None:
        rt = self.rt
        body = {
            "advertise": rt.advertise,
            "services": {s.name: "" for s in rt.config.services},
            "bundle": list(rt.creds.current.bundle.fingerprints),
        }
        self.client.call("PUT", "/v1/registration", body)
        self._registered_at, self._register_needed = now, False

    def _bundle(self, body: Any) -> None:
        rt = self.rt
        if isinstance(body, dict):
            self._servers(body.get("servers"))
        if isinstance(body, dict) and isinstance(body.get("active"), str):
            self._active = body["active"]
        try:
            bundle = TrustBundle.from_pem(str(body["bundle"]).encode())
        except (KeyError, TypeError, PKIError) as exc:
            raise ConfigError(f"trust bundle from the server is unusable: {exc}") from exc
        if bundle.fingerprints == rt.creds.current.bundle.fingerprints:
            return
        save_bundle(rt.paths, bundle)
        rt.creds.swap(bundle=bundle)
        self.client.reset()  # the kept connection's server was verified against the old bundle
        log_event(log, "bundle-updated", level=logging.WARNING, fingerprints=list(bundle.fingerprints))
        self._register(time.monotonic())  # tell the control plane at once: rotation steps wait for it

    def _servers(self, listed: Any) -> None:
        """Adopt the servers the control plane lists (every server on its database); keep them in agent.toml."""
        if not isinstance(listed, list) or not listed or not all(isinstance(s, str) for s in listed):
            return
        try:
            servers = tuple(format_hostport(*parse_hostport(s, what="server address")) for s in listed[:MAX_SERVERS])
        except ConfigError:
            return
        if set(servers) == set(self.client.servers):
            return
        ident = load_identity(self.rt.paths)
        write_atomic(self.rt.paths.identity, dataclasses.replace(ident, servers=servers).to_toml(), mode=0o600)
        self.client.servers = list(servers)
        log_event(log, "servers-updated", servers=list(servers))

    def _set_up(self, up: bool, exc: Exception | None) -> None:
        self._down_rounds = 0 if up else self._down_rounds + 1
        CONTROL_PLANE_UP.set(1 if up else 0)
        if up != self._was_up:
            if up:
                log_event(log, "control-plane-up", servers=self.client.servers)
            else:
                log_event(
                    log, "control-plane-down", level=logging.WARNING, servers=self.client.servers, detail=str(exc)
                )
        self._was_up = up
        self.rt.control_plane_up = up

    # --- renewal -----------------------------------------------------------------------
    def _maybe_renew(self) -> None:
        rt = self.rt
        material = rt.creds.current
        now = rt.now()
        if not material.creds.renewal_due(now, rt.config.renew_fraction) and not self._early(material.creds):
            self._backoff, self._next_renew_try = 0.0, 0.0
            return
        mono = time.monotonic()
        if self._next_renew_try and mono < self._next_renew_try:
            return
        try:
            new = renewal.renew(
                rt.paths, now, self.client, max_clock_skew=dt.timedelta(seconds=rt.config.max_clock_skew)
            )
        except TapproofError as exc:
            life = material.creds.lifetime.total_seconds()
            cap = max(1.0, min(60.0, life * 0.05))
            self._backoff = min(cap, self._backoff * 2 if self._backoff else 1.0)
            self._next_renew_try = mono + self._backoff
            RENEWALS.labels("failure").inc()
            log_event(
                log,
                "renewal-failed",
                level=logging.WARNING,
                detail=str(exc),
                retry_in=round(self._backoff, 2),
                not_after=material.not_after,
            )
            return
        try:
            rt.creds.reload_from_disk()  # the new key and chain, and the bundle that came with them
        except TapproofError as exc:  # the files were written but do not load: use what renew() returned
            log_event(log, "reload-after-renewal-failed", level=logging.WARNING, detail=str(exc))
            rt.creds.swap(new, None)
        self._backoff, self._next_renew_try = 0.0, 0.0
        self._early_at = 0.0
        self._etags.pop("/v1/bundle", None)  # the renewal may have brought a bundle: compare in full next round
        RENEWALS.labels("success").inc()

    def _early(self, creds: Credentials) -> bool:
        """True once a chain ending at a non-active root waited out its random delay."""
        bundle = self.rt.creds.current.bundle
        if not self._active or self._active not in bundle.fingerprints:
            self._early_at = 0.0
            return False
        if expiry.chain_root(creds.chain, bundle.roots) == self._active:
            self._early_at = 0.0
            return False
        mono = time.monotonic()
        if not self._early_at:
            cap = max(0.0, min(60.0, creds.lifetime.total_seconds() / 10))
            self._early_at = mono + random.uniform(0.0, cap)  # noqa: S311 - jitter, not a secret
            self._next_renew_try = self._early_at
            log_event(
                log, "renewal-early", reason="chain to a non-active root", in_seconds=round(self._early_at - mono, 1)
            )
        return mono >= self._early_at

    @property
    def warn(self) -> expiry.WarnPolicy:
        """The expiry thresholds of the current config (``--expiry-warn``; follows a SIGHUP reload)."""
        return expiry.parse_warn(self.rt.config.expiry_warn)

    def expiries(self) -> list[dict[str, object]]:
        """Leaf, intermediate(s) and roots with time left and warning flags (the agent's ``/status``)."""
        material = self.rt.creds.current
        now = self.rt.now()
        return [e.to_json(now, self.warn) for e in expiry.of_chain(material.creds.chain, material.bundle.roots)]

    def _expiry(self) -> None:
        material = self.rt.creds.current
        creds = material.creds
        now = self.rt.now()
        CA_EXPIRY.clear()
        CA_WARNING.clear()
        for e in expiry.of_chain(creds.chain, material.bundle.roots):
            CA_EXPIRY.labels(e.kind, e.name).set(e.seconds_left(now))
            reached = self.warn.for_kind(e.kind).reached(e.not_before, e.not_after, now)
            CA_WARNING.labels(e.kind, e.name).set(1 if reached else 0)
        left = (creds.not_after - now).total_seconds()
        CERT_EXPIRY.set(left)
        mono = time.monotonic()
        leaf_warn = self.warn.for_kind("leaf").reached(creds.issued_at, creds.not_after, now)
        if leaf_warn and mono - self._last_warn >= 30.0:
            self._last_warn = mono
            if left <= 0:
                log_event(log, "certificate-expired", level=logging.ERROR, not_after=creds.not_after)
            else:
                log_event(
                    log,
                    "certificate-expiring",
                    level=logging.WARNING,
                    not_after=creds.not_after,
                    seconds_left=int(left),
                    hint="renewal keeps failing: check the control plane",
                )
