"""The CA rotation state machine (pure: snapshots and time in, decisions out).

Roots move ``prepared`` -> ``active`` -> ``retiring`` -> removed:

* **steady**: one ``active`` root. Bundle = {active}.
* **prepare** adds a ``prepared`` root (the *next* one) and, under it, an
  intermediate for every server's current intermediate key. Bundle = {active,
  prepared}; nothing is issued under the new root yet.
* **activate** (compare-and-set): prepared -> active, active -> retiring.
  Servers switch their own chain and every new leaf to the new root; both
  roots are still trusted.
* **retire** removes the retiring root from the bundle.

Each step says what blocks it instead of breaking a live fleet; ``force``
overrides the blockers (never the state checks). A server or host counts as
*live* when it reported within ``live_window``.

The intermediate of one server rotates by itself at half its life
(:func:`intermediate_action`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Literal

from tapproof.store.base import (
    CAServerRecord,
    CertificateRecord,
    HostRecord,
    IntermediateRecord,
    RootState,
    TrustRootRecord,
)

Phase = Literal["steady", "prepared", "activated", "broken"]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the store says, read at ``now``."""

    now: dt.datetime
    roots: Sequence[TrustRootRecord]
    intermediates: Sequence[IntermediateRecord] = ()
    servers: Sequence[CAServerRecord] = ()
    hosts: Sequence[HostRecord] = ()
    certificates: Sequence[CertificateRecord] = ()  # unexpired, unrevoked
    live_window: dt.timedelta = dt.timedelta(minutes=5)

    def root_in(self, state: RootState) -> TrustRootRecord | None:
        """The (first) root in ``state``."""
        return next((r for r in self.roots if r.state == state), None)

    def live_servers(self) -> list[CAServerRecord]:
        """Servers that reported within the live window."""
        return [s for s in self.servers if self.now - s.seen_at <= self.live_window]

    def live_hosts(self) -> list[HostRecord]:
        """Unrevoked hosts seen within the live window."""
        return [
            h
            for h in self.hosts
            if h.revoked_at is None and h.last_seen is not None and self.now - h.last_seen <= self.live_window
        ]


@dataclasses.dataclass(frozen=True)
class Step:
    """A decision: the compare-and-set to apply, or why not."""

    expected: dict[str, RootState]
    changes: dict[str, RootState | None]
    blockers: tuple[str, ...] = ()
    error: str = ""  # a state error: not overridable by --force

    @property
    def ok(self) -> bool:
        """True when nothing blocks."""
        return not self.error and not self.blockers


def phase(roots: Sequence[TrustRootRecord]) -> Phase:
    """Where the rotation stands."""
    states = sorted(r.state for r in roots)
    if states == ["active"]:
        return "steady"
    if states == ["active", "prepared"]:
        return "prepared"
    if states == ["active", "retiring"]:
        return "activated"
    return "broken"


def _bundle(fps: str) -> set[str]:
    return {f for f in fps.split(",") if f}


def _short(fp: str) -> str:
    return fp[:16]


def check_prepare(snap: Snapshot) -> Step:
    """Prepare needs a steady state (one active root, nothing half done)."""
    ph = phase(snap.roots)
    if ph != "steady":
        return Step({}, {}, error=f"a rotation is already under way ({ph}): activate or retire it first")
    active = snap.root_in("active")
    assert active is not None  # noqa: S101 - steady means one active root
    return Step({active.fingerprint: "active"}, {})


def check_activate(snap: Snapshot) -> Step:
    """Activation needs the prepared root everywhere: in every live server's and host's bundle,
    and an intermediate under it for every live server's key."""
    ph = phase(snap.roots)
    if ph != "prepared":
        hint = "run `tapproof server ca rotate prepare` first" if ph == "steady" else f"the rotation is {ph}"
        return Step({}, {}, error=f"no prepared root to activate: {hint}")
    new, old = snap.root_in("prepared"), snap.root_in("active")
    if new is None or old is None:  # pragma: no cover - phase() checked the states
        return Step({}, {}, error="inconsistent root states")
    blockers: list[str] = []
    keys_under_new = {i.key_id for i in snap.intermediates if i.root == new.fingerprint}
    key_of = {i.fingerprint: i.key_id for i in snap.intermediates}
    for s in snap.live_servers():
        if new.fingerprint not in _bundle(s.bundle):
            blockers.append(f"server {s.name} does not trust the new root yet (it reloads CA state every few seconds)")
        if key_of.get(s.intermediate) not in keys_under_new:
            blockers.append(
                f"server {s.name} has no intermediate under the new root: run `tapproof server ca sign-intermediate`"
            )
    blockers += [
        f"host {h.name} has not reported the new bundle yet"
        for h in snap.live_hosts()
        if new.fingerprint not in _bundle(h.bundle)
    ]
    return Step(
        {new.fingerprint: "prepared", old.fingerprint: "active"},
        {new.fingerprint: "active", old.fingerprint: "retiring"},
        tuple(blockers),
    )


def _latest_per_identity(certificates: Sequence[CertificateRecord]) -> dict[str, CertificateRecord]:
    # Servers share one SPIFFE ID: their certificates are told apart by the issuing server.
    latest: dict[str, CertificateRecord] = {}
    for c in certificates:
        if c.kind in ("intermediate", "admin"):  # admin certificates are re-issued locally on demand
            continue
        key = f"server:{c.issuer}" if c.kind == "server" else c.spiffe_id
        if key not in latest or c.issued_at >= latest[key].issued_at:
            latest[key] = c
    return latest


def check_retire(snap: Snapshot) -> Step:
    """Retirement needs nothing in use under the old root: no live server serving a chain to it,
    no identity whose newest unexpired certificate chains to it."""
    ph = phase(snap.roots)
    if ph != "activated":
        return Step({}, {}, error=f"no retiring root: the rotation is {ph} (activate first)")
    old, new = snap.root_in("retiring"), snap.root_in("active")
    if new is None or old is None:  # pragma: no cover - phase() checked the states
        return Step({}, {}, error="inconsistent root states")
    blockers: list[str] = []
    blockers += [
        f"server {s.name} still serves a chain to the old root"
        for s in snap.live_servers()
        if s.root == old.fingerprint
    ]
    # root "": issued before schema v2 recorded it (under the only root there was): counted as the old root
    stuck = [c for c in _latest_per_identity(snap.certificates).values() if c.root in (old.fingerprint, "")]
    for c in sorted(stuck, key=lambda c: c.not_after):
        left = int((c.not_after - snap.now).total_seconds())
        to = "the old root" if c.root else "an unrecorded root (issued before schema v2)"
        blockers.append(f"{c.kind} certificate {c.serial[:16]} of {c.spiffe_id} chains to {to} ({left}s left)")
    return Step(
        {old.fingerprint: "retiring", new.fingerprint: "active"},
        {old.fingerprint: None},
        tuple(blockers),
    )


Action = Literal["none", "sign-now", "request", "wait"]


@dataclasses.dataclass(frozen=True)
class IntermediatePlan:
    """What a server does about its own intermediate this round."""

    action: Action
    due: bool  # past the rotation point (half its life)
    warn: bool  # the warning threshold is crossed and no new intermediate is in place


def intermediate_action(
    *,
    now: dt.datetime,
    not_before: dt.datetime,
    not_after: dt.datetime,
    root_key_here: bool,
    request_pending: bool,
    warn_reached: bool,
    fraction: float = 0.5,
) -> IntermediatePlan:
    """Rotate at ``fraction`` of the lifetime: sign at once when the root key is here, else queue
    a request (``request``) and keep waiting for someone to sign it (``wait``)."""
    due = now >= not_before + (not_after - not_before) * fraction
    if not due:
        return IntermediatePlan("none", False, warn_reached)
    if root_key_here:
        return IntermediatePlan("sign-now", True, warn_reached)
    return IntermediatePlan("wait" if request_pending else "request", True, warn_reached)
