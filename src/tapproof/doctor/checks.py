"""Sans-I/O evaluations: observed facts in, :class:`~tapproof.doctor.result.Check` out.

Nothing here opens a file or a socket or reads the clock: ``now`` and every
observation are arguments, so each threshold is tested with injected values.

Thresholds, and why:

* clock skew: WARN from :data:`SKEW_WARN` (2 s; NTP/chrony keep hosts within
  milliseconds, so seconds mean time sync is off), FAIL from :data:`SKEW_FAIL`
  (half of the 5-minute backdate of every certificate's ``notBefore``: past it a
  host that runs behind soon sees fresh certificates as not yet valid);
* a host certificate: WARN when less than :data:`LEAF_WARN_LEFT` of its
  lifetime is left (renewal is due at half life, so a quarter left means
  renewals have been failing for a while), FAIL when expired or not yet valid;
* an intermediate: WARN when less than :data:`INTERMEDIATE_WARN_LEFT` is left
  (intermediates are rotated before half life); a root: WARN when less than
  :data:`ROOT_WARN_LEFT` is left (root rotation is by command and needs
  planning).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence

from tapproof.doctor.result import Check, fail, ok, skip, warn
from tapproof.pki import certs
from tapproof.units import format_duration

__all__ = [
    "SKEW_FAIL",
    "SKEW_WARN",
    "ApiProbe",
    "Validity",
    "agent_health",
    "best_probe",
    "ca_certificate",
    "clock_skew",
    "leaf_certificate",
    "listeners",
    "pq_group",
    "server_api",
    "transparent_rules",
    "trust_bundle",
]

SKEW_WARN = dt.timedelta(seconds=2)
SKEW_FAIL = certs.BACKDATE / 2
LEAF_WARN_LEFT = 0.25
INTERMEDIATE_WARN_LEFT = 0.4
ROOT_WARN_LEFT = 0.2
PQ_GROUP = "X25519MLKEM768"
DATE_RESOLUTION = dt.timedelta(seconds=1)  # an HTTP Date header has whole seconds


@dataclasses.dataclass(frozen=True)
class Validity:
    """A certificate's validity window; ``issued_at`` excludes the backdate of ``not_before``."""

    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime

    @property
    def lifetime(self) -> dt.timedelta:
        """Granted lifetime (from issuance)."""
        return self.not_after - self.issued_at

    def left(self, now: dt.datetime) -> dt.timedelta:
        """Time left at ``now`` (negative once expired)."""
        return self.not_after - now

    def fraction_left(self, now: dt.datetime) -> float:
        """Share of the lifetime left at ``now`` (0 when the lifetime is empty)."""
        life = self.lifetime.total_seconds()
        return self.left(now).total_seconds() / life if life > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class ApiProbe:
    """What one call to one control-plane server showed.

    ``stage`` is how far it got: ``connect`` (no TCP connection), ``tls`` (the
    handshake failed or was refused), ``identity`` (the peer is not a tapproof
    server of our trust domain), ``http`` (no usable answer) or ``done``.
    """

    address: str
    stage: str
    error: str = ""
    status: int = 0
    group: str = ""
    local_before: dt.datetime | None = None
    local_after: dt.datetime | None = None
    server_time: dt.datetime | None = None  # from the /v1/healthz body (microseconds)
    server_date: dt.datetime | None = None  # from the Date header (whole seconds)
    chain: tuple[Validity, ...] = ()  # the server's leaf, then its intermediates
    bundle: tuple[str, ...] | None = None  # root fingerprints the server publishes

    @property
    def answered(self) -> bool:
        """True when the server answered an HTTP request over a verified PQ mutual-TLS connection."""
        return self.stage == "done"


def _ago(delta: dt.timedelta) -> str:
    return format_duration(abs(delta))


def leaf_certificate(v: Validity, now: dt.datetime, *, name: str = "agent.certificate") -> Check:
    """A host certificate: expired / not yet valid (FAIL), renewal overdue (WARN), fine (OK)."""
    details = {
        "subject": v.subject,
        "not_after": v.not_after.isoformat(),
        "seconds_left": int(v.left(now).total_seconds()),
        "lifetime_seconds": int(v.lifetime.total_seconds()),
    }
    if now >= v.not_after:
        return fail(
            name,
            f"expired {_ago(now - v.not_after)} ago ({v.subject})",
            "the agent could not renew in time: make the control plane reachable (see server.api), "
            "then re-enroll: `tapproof server token create --host NAME` on the server, "
            "`tapproof agent enroll --data-dir A --join JOIN` here",
            **details,
        )
    if now < v.not_before:
        return fail(
            name,
            f"not valid for another {_ago(v.not_before - now)}: this host's clock is behind",
            "fix time synchronisation (chrony/systemd-timesyncd), see clock.skew",
            **details,
        )
    frac = v.fraction_left(now)
    summary = f"{_ago(v.left(now))} left of {_ago(v.lifetime)} ({frac:.0%})"
    if frac < LEAF_WARN_LEFT:
        return warn(
            name,
            f"renewal overdue: {summary}",
            "renewal is due at half life and has not happened: is the agent running (agent.health) and the "
            "control plane reachable (server.api)? see the agent's log for renew-failed",
            **details,
        )
    return ok(name, summary, **details)


def ca_certificate(v: Validity, now: dt.datetime, *, name: str, kind: str) -> Check:
    """An intermediate (``kind='intermediate'``) or root (``kind='root'``) CA certificate."""
    details = {"subject": v.subject, "not_after": v.not_after.isoformat(), "days_left": v.left(now).days}
    if now >= v.not_after:
        return fail(
            name,
            f"{kind} expired {_ago(now - v.not_after)} ago",
            "rotate it on the control plane: `tapproof server ca rotate` (see docs/deploy.md)",
            **details,
        )
    frac = v.fraction_left(now)
    limit = INTERMEDIATE_WARN_LEFT if kind == "intermediate" else ROOT_WARN_LEFT
    summary = f"{kind} {_ago(v.left(now))} left of {_ago(v.lifetime)} ({frac:.0%})"
    if frac < limit:
        fix = (
            "intermediates rotate before half life: check the server's log for the intermediate rotation"
            if kind == "intermediate"
            else "plan a root rotation: `tapproof server ca rotate` (prepare, activate, retire)"
        )
        return warn(name, summary, fix, **details)
    return ok(name, summary, **details)


def trust_bundle(
    local: Sequence[tuple[str, Validity]],
    server: Sequence[str] | None,
    now: dt.datetime,
    *,
    age: dt.timedelta | None = None,
) -> Check:
    """The host's trust bundle: roots still valid, and the same roots as the server publishes.

    ``local`` is (fingerprint, validity) per root; ``server`` the fingerprints
    the control plane publishes (None: not known, the server did not answer).
    """
    name = "agent.bundle"
    fps = [fp for fp, _ in local]
    details: dict[str, object] = {"roots": fps, "server_roots": list(server) if server is not None else None}
    if age is not None:
        details["age_seconds"] = int(age.total_seconds())
    valid = [v for _, v in local if v.not_before <= now < v.not_after]
    if not valid:
        return fail(
            name,
            "no root in the trust bundle is valid now",
            "the bundle is out of date or the clock is wrong (clock.skew): re-enroll with a new join string",
            **details,
        )
    age_text = f", file {_ago(age)} old" if age is not None else ""
    if server is None:
        return ok(name, f"{len(valid)} valid root(s){age_text}; not compared with the server", **details)
    missing = [fp for fp in server if fp not in fps]
    extra = [fp for fp in fps if fp not in server]
    if missing:
        return warn(
            name,
            f"stale: the server publishes {len(missing)} root(s) this host does not trust yet{age_text}",
            "a root rotation is under way and this agent has not picked up the new bundle: it does within "
            "--sync-interval when it reaches the control plane; if this persists, check agent.health and the "
            "agent's log (bundle-update refused?)",
            **details,
        )
    if extra:
        return warn(
            name,
            f"stale: this host still trusts {len(extra)} root(s) the server retired{age_text}",
            "the agent drops retired roots on its next sync; if this persists, check agent.health and its log",
            **details,
        )
    return ok(name, f"{len(valid)} valid root(s), same as the server{age_text}", **details)


def clock_skew(probe: ApiProbe | None) -> Check:
    """Skew of this host's clock against the server's: server time minus the midpoint of our request.

    The uncertainty is half the round trip (plus the Date header's one-second
    resolution when the body has no time); only what exceeds it counts.
    """
    name = "clock.skew"
    if probe is None or probe.local_before is None or probe.local_after is None:
        return skip(name, "not measured: no server answered")
    half_rtt = (probe.local_after - probe.local_before) / 2
    midpoint = probe.local_before + half_rtt
    if probe.server_time is not None:
        skew, error = probe.server_time - midpoint, half_rtt
    elif probe.server_date is not None:
        skew, error = probe.server_date + DATE_RESOLUTION / 2 - midpoint, half_rtt + DATE_RESOLUTION / 2
    else:
        return skip(name, f"not measured: {probe.address} sent no time")
    return evaluate_skew(skew, error, probe.address)


def evaluate_skew(skew: dt.timedelta, error: dt.timedelta, address: str) -> Check:
    """Judge a measured skew (server minus local) with its uncertainty."""
    name = "clock.skew"
    secs = skew.total_seconds()
    details = {
        "skew_seconds": round(secs, 3),
        "uncertainty_seconds": round(error.total_seconds(), 3),
        "server": address,
    }
    direction = "behind" if secs > 0 else "ahead of"
    summary = f"{abs(secs):.3f}s {direction} {address} (±{error.total_seconds():.3f}s)"
    beyond = abs(skew) - error
    fix = (
        "enable time synchronisation on this host and the server (chrony or systemd-timesyncd; "
        "`timedatectl status` should say 'System clock synchronized: yes')"
    )
    if beyond >= SKEW_FAIL:
        return fail(name, summary + f": certificates break beyond {format_duration(SKEW_FAIL)}", fix, **details)
    if beyond >= SKEW_WARN:
        return warn(name, summary, fix, **details)
    return ok(name, summary, **details)


def best_probe(probes: Sequence[ApiProbe]) -> ApiProbe | None:
    """The first probe that got an answer, else None."""
    return next((p for p in probes if p.answered), None)


_STAGE_FIX = {
    "connect": "nothing listens there: start the server (`systemctl start tapproof-server`, or "
    "`tapproof server run`), or open the path to it (firewall, address in the agent's agent.toml)",
    "tls": "the TLS handshake was refused: an expired or revoked certificate (see the certificate checks), "
    "a trust bundle without the server's root (agent.bundle), or a server without X25519MLKEM768",
    "identity": "that address does not answer as a tapproof server of this trust domain: check the address",
    "http": "the server accepted the connection but gave no usable answer: see the server's log",
}


def server_api(probes: Sequence[ApiProbe], *, who: str) -> Check:
    """Reachability of the control plane with this host's credentials (``who`` names them)."""
    name = "server.api"
    if not probes:
        return fail(name, "no control-plane address configured", "re-enroll with a join string from the server")
    details = {p.address: (f"{p.status}" if p.answered else f"{p.stage}: {p.error}") for p in probes}
    good = [p for p in probes if p.answered and p.status == 200]
    if not good:
        first = probes[0]
        unavailable = [p for p in probes if p.answered and p.status == 503]
        if unavailable:
            return fail(
                name,
                f"{unavailable[0].address} answers 503: its database is unavailable",
                "check the database (PostgreSQL reachable? disk full?) and the server's log; the server "
                "recovers by itself once the database is back",
                **details,
            )
        answered = [p for p in probes if p.answered]
        if answered:
            p = answered[0]
            return fail(
                name,
                f"{p.address} answered HTTP {p.status} to {who}",
                "the server did not accept these credentials for host calls: revoked host? re-enroll",
                **details,
            )
        return fail(
            name,
            f"no server reachable with {who}: {first.address}: {first.stage}: {first.error}",
            _STAGE_FIX.get(first.stage, _STAGE_FIX["http"]),
            **details,
        )
    down = [p for p in probes if p not in good]
    if down:
        d = down[0]
        return warn(
            name,
            f"{good[0].address} answers; {d.address} does not ({d.stage}: {d.error})",
            "agents fail over to the servers that answer; bring the other back: " + _STAGE_FIX.get(d.stage, ""),
            **details,
        )
    return ok(name, f"{len(good)} server(s) answer {who} over mutual TLS", **details)


def pq_group(probe: ApiProbe | None) -> Check:
    """The key exchange negotiated with the control plane must be the PQ hybrid."""
    name = "server.pq"
    if probe is None or not probe.group:
        return skip(name, "not measured: no TLS connection to a server")
    if probe.group != PQ_GROUP:
        return fail(
            name,
            f"{probe.address} negotiated {probe.group}, not {PQ_GROUP}",
            "a recording of this link is not safe against a future quantum computer: upgrade the server's "
            "tapproof/cryptography (OpenSSL >= 3.5) and remove any --unsafe-classical setting",
            group=probe.group,
        )
    return ok(name, f"{probe.group} with {probe.address}", group=probe.group)


def agent_health(address: str, status: int, reason: str, error: str = "") -> Check:
    """The agent's ``/healthz``: 200 (OK), 503 with a reason (FAIL), unreachable (FAIL)."""
    name = "agent.health"
    if error:
        return fail(
            name,
            f"no agent admin endpoint at {address}: {error}",
            "start the agent (`systemctl start tapproof-agent`, or `tapproof agent run --data-dir A`); "
            "if it runs with another --admin address, pass that as --admin",
            admin=address,
        )
    if status == 200:
        return ok(name, f"{address}/healthz: {reason or 'ok'}", admin=address)
    return fail(
        name,
        f"{address}/healthz answers {status}: {reason}",
        "see the agent's log for the cause; the certificate and server checks below usually name it",
        admin=address,
        reason=reason,
    )


def listeners(results: Mapping[str, tuple[str, str]]) -> Check:
    """The agent's own ports: ``{label: (address, error or '')}``; FAIL if any does not accept."""
    name = "agent.ports"
    if not results:
        return skip(name, "no agent listener known (agent not running?)")
    bad = {k: v for k, v in results.items() if v[1]}
    details = {k: a for k, (a, _e) in results.items()}
    if bad:
        label, (addr, err) = next(iter(bad.items()))
        return fail(
            name,
            f"{label} port {addr} does not accept connections: {err}",
            "the agent lost a listener: restart it and read its log for the bind error",
            **details,
        )
    return ok(name, ", ".join(f"{k} {a}" for k, (a, _e) in results.items()) + " accept connections", **details)


def _chains(listing: str) -> tuple[set[str], list[list[str]]]:
    chains: set[str] = set()
    rules: list[list[str]] = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-N":
            chains.add(parts[1])
        elif len(parts) >= 2 and parts[0] == "-A":
            rules.append(parts[1:])
    return chains, rules


def _jumps_to(rules: Iterable[list[str]], hook: str, chain: str) -> bool:
    return any(r[0] == hook and "-j" in r and r[r.index("-j") + 1] == chain for r in rules)


def transparent_rules(
    listing: str | None,
    *,
    expected: bool,
    transparent_port: int | None = None,
    inbound_port: int | None = None,
    error: str = "",
) -> Check:
    """The ``TAPPROOF-*`` chains in ``iptables -t nat -S`` output against what the agent's mode needs.

    ``listing`` None means it could not be read (``error`` says why).
    """
    name = "transparent.rules"
    if listing is None:
        if expected:
            return warn(
                name,
                f"transparent mode is on but the rules cannot be read: {error}",
                "run tapproof doctor as root (iptables -t nat -S needs CAP_NET_ADMIN)",
            )
        return skip(name, f"transparent mode off; rules not read ({error})")
    chains, rules = _chains(listing)
    ours = sorted(c for c in chains if c.startswith("TAPPROOF-"))
    details: dict[str, object] = {"chains": ours}
    if not expected:
        if ours:
            return warn(
                name,
                f"transparent mode is off but {', '.join(ours)} exist (left by a crashed agent)",
                "they redirect to a port nobody serves (connections refused): remove them with "
                "`python -m tapproof.agent.transparent --repair`",
                **details,
            )
        return ok(name, "transparent mode off, no TAPPROOF-* rules", **details)
    missing = [
        f"{hook} -> {chain}"
        for hook, chain in (("OUTPUT", "TAPPROOF-OUTPUT"), ("PREROUTING", "TAPPROOF-PREROUTING"))
        if chain not in chains or not _jumps_to(rules, hook, chain)
    ]
    for chain, port in (("TAPPROOF-OUTPUT", transparent_port), ("TAPPROOF-PREROUTING", inbound_port)):
        targets = {r[-1] for r in rules if r[0] == chain and "REDIRECT" in r}
        details[chain] = sorted(targets)
        if port is not None and targets - {str(port)}:
            missing.append(f"{chain} redirects to {', '.join(sorted(targets))}, the agent listens on {port}")
    if missing:
        return fail(
            name,
            "transparent mode is on but rules are missing or wrong: " + "; ".join(missing),
            "fleet traffic is not redirected into the agent (it goes out in plaintext): restart the agent, "
            "which reinstalls its rules, and check that nothing else flushes the nat table",
            **details,
        )
    return ok(name, f"{', '.join(ours)} installed", **details)
