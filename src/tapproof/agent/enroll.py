"""Enrollment: from a join string to a key, a certificate and a trust bundle in the data dir.

The key is made here and never leaves; the server's chain must end at the
root pinned in the join string (checked before the secret is sent), and the
returned certificate must chain to that same root and carry our key. Files
are written only after every check passed, into a temporary directory that
is then moved into place: a refused enrollment writes no credentials (only the
pending key below).

The key is saved (0600, ``.enroll-pending-*.pem`` in the data dir, named after
the join token's hash) just before the secret is sent, and reused by the next
``enroll`` with the same join string: if a server dies after it spent the token
and before it answered, the retry (on another server, or after a restart)
repeats the redemption with the same key, which the server accepts for 10
minutes after the first use (see ``Store.redeem_token`` for the limits). The
file is removed once the enrollment is written, and when the server refused it
(a 4xx answer: the token was not spent for this key); it stays only when the
outcome is unknown.

Clock skew (:mod:`tapproof.agent.clockskew`) is measured twice: on a
``GET /v1/bundle`` before the join secret is sent (a refusal then keeps the
token unspent) and on the enrollment answer (its ``Date`` header, else the
certificate's ``notBefore``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tapproof import identity
from tapproof.agent import clockskew
from tapproof.agent.state import AgentIdentity, AgentPaths, save_credentials
from tapproof.control import joinstring, tlsctx
from tapproof.control.client import date_probe, pinned_call
from tapproof.errors import APIError, ConfigError, PeerReason, PeerRejected, PKIError, TapproofError
from tapproof.logs import log_event
from tapproof.pki import certs, csr, keys
from tapproof.pki.verify import check_leaf, verify_chain
from tapproof.tls import pinning
from tapproof.tls.credentials import Credentials, TrustBundle

log = logging.getLogger(__name__)


def enroll(
    data_dir: Path,
    join: str,
    *,
    algorithm: keys.Algorithm = "ecdsa-p256",
    max_clock_skew: dt.timedelta = clockskew.DEFAULT_MAX_SKEW,
) -> Credentials:
    """Enroll with ``join``; return the new credentials (also written to ``data_dir``).

    ``max_clock_skew`` (``--max-clock-skew``; 0 disables the check): refuse with
    :class:`ClockSkewError` when this host's clock is further off the server's.
    """
    js = joinstring.parse(join)
    paths = AgentPaths(Path(data_dir))
    if paths.enrolled():
        raise ConfigError(f"--data-dir: {paths.root} is already enrolled; use another directory or remove it")
    if paths.root.exists() and not paths.root.is_dir():
        raise ConfigError(f"--data-dir: {paths.root} is not a directory")
    pending_path = paths.root / f".enroll-pending-{hashlib.sha256(js.secret.encode()).hexdigest()[:16]}.pem"
    key = _load_pending(pending_path)
    pending = key is not None
    key = key or keys.generate(algorithm)
    sent = dt.datetime.now(dt.UTC)
    try:
        _status, headers, _body = pinned_call(js.servers, js.trust_domain, js.fingerprint, key, "GET", "/v1/bundle")
    except PeerRejected as exc:  # maybe only our clock: ask for the server's time, all else checked
        try:
            date = date_probe(
                js.servers,
                lambda: tlsctx.bootstrap_client_context(key),
                lambda s, when: pinning.verify_pinned(s, js.fingerprint, js.trust_domain, when),
            )
        except TapproofError:
            raise exc from None
        clockskew.enforce(clockskew.measure(sent, dt.datetime.now(dt.UTC), date), max_clock_skew, at="enrollment")
        raise
    clockskew.enforce(
        clockskew.measure(sent, dt.datetime.now(dt.UTC), headers.get("date")), max_clock_skew, at="enrollment"
    )
    sent = dt.datetime.now(dt.UTC)
    body = {"token": js.secret, "csr": csr.build(key, None).decode()}
    created = not paths.root.exists()
    if not pending:
        paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.save(key, pending_path)
    try:
        _status, headers, resp = pinned_call(
            js.servers, js.trust_domain, js.fingerprint, key, "POST", "/v1/enroll", body
        )
    except (APIError, PeerRejected, ConfigError) as exc:
        if not isinstance(exc, APIError) or exc.status < 500:  # refused: nothing was spent for this key
            _drop_pending(pending_path, remove_dir=created)
        raise
    now = dt.datetime.now(dt.UTC)
    try:
        chain = tuple(certs.load_pem_chain(str(resp["certificate"]).encode(), what="issued certificate"))
        bundle = TrustBundle.from_pem(str(resp["bundle"]).encode())
    except (KeyError, TypeError, PKIError) as exc:
        raise PeerRejected(PeerReason.UNTRUSTED, f"server sent an unusable enrollment answer: {exc}") from exc
    clockskew.enforce(
        clockskew.measure(sent, now, headers.get("date"), chain[0].not_valid_before_utc),
        max_clock_skew,
        at="enrollment",
    )
    pinned = [r for r in bundle.roots if certs.fingerprint(r) == js.fingerprint]
    if not pinned:
        raise PeerRejected(PeerReason.FINGERPRINT_MISMATCH, "returned trust bundle lacks the pinned root")
    if chain[0].public_key() != key.public_key():
        raise PeerRejected(PeerReason.UNTRUSTED, "issued certificate is not for our key")
    verify_chain(chain[0], chain[1:], pinned, now)
    sid = check_leaf(
        chain[0], trust_domain=js.trust_domain, now=now, usage="client", accept=lambda s: s.kind is identity.Kind.HOST
    )
    creds = Credentials(key, chain)
    servers = tuple(str(s) for s in resp.get("servers") or js.servers)
    _write(paths, creds, bundle, AgentIdentity(js.trust_domain, sid.name, servers))
    for stale in paths.root.glob(".enroll-pending-*.pem"):
        stale.unlink(missing_ok=True)
    if pending:
        log_event(log, "enroll-key-reused", detail="a key saved by an earlier attempt with this join string")
    log_event(log, "enrolled", spiffe_id=str(sid), not_after=creds.not_after, serial=certs.serial_hex(chain[0]))
    return creds


def _load_pending(path: Path) -> keys.PrivateKey | None:
    """The key an earlier attempt with this join string saved, if any."""
    if not path.is_file():
        return None
    try:
        return keys.load(path, what="pending enrollment key")
    except ConfigError:
        path.unlink(missing_ok=True)  # unreadable (a crash mid-write): start over with a new key
        return None


def _drop_pending(path: Path, *, remove_dir: bool) -> None:
    """Forget the pending key (and the data dir, if it was made only for it)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
        if remove_dir:
            path.parent.rmdir()  # only if empty


def _write(paths: AgentPaths, creds: Credentials, bundle: TrustBundle, ident: AgentIdentity) -> None:
    parent = paths.root.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # inside the data dir when it exists (it may be a mount point: a rename must not cross devices)
    tmp = Path(tempfile.mkdtemp(prefix=".tapproof-enroll-", dir=paths.root if paths.root.is_dir() else parent))
    try:
        t = AgentPaths(tmp)
        save_credentials(t, creds)  # tmp/creds/gN, tmp/current and the key.pem/cert.pem links (all relative)
        (t.bundle).write_bytes(bundle.to_pem())
        (t.identity).write_bytes(ident.to_toml())
        if not paths.root.exists():
            os.rename(tmp, paths.root)
            return
        if (paths.root / "creds").exists():  # left by an earlier, interrupted enrollment (not enrolled)
            shutil.rmtree(paths.root / "creds")
        for name in ("creds", "current", "key.pem", "cert.pem", "bundle.pem", "agent.toml"):  # identity last
            os.replace(tmp / name, paths.root / name)
        paths.root.chmod(0o700)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
