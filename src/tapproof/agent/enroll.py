"""Enrollment: from a join string to a key, a certificate and a trust bundle in the data dir.

The key is made here and never leaves; the server's chain must end at the
root pinned in the join string (checked before the secret is sent), and the
returned certificate must chain to that same root and carry our key. Files
are written only after every check passed, into a temporary directory that
is then moved into place: a refused enrollment writes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tapproof import identity
from tapproof.agent.state import AgentIdentity, AgentPaths
from tapproof.control import joinstring
from tapproof.control.client import enroll_pinned
from tapproof.errors import ConfigError, PeerReason, PeerRejected, PKIError
from tapproof.logs import log_event
from tapproof.pki import certs, csr, keys
from tapproof.pki.verify import check_leaf, verify_chain
from tapproof.tls.credentials import Credentials, TrustBundle

log = logging.getLogger(__name__)


def enroll(data_dir: Path, join: str, *, algorithm: keys.Algorithm = "ecdsa-p256") -> Credentials:
    """Enroll with ``join``; return the new credentials (also written to ``data_dir``)."""
    js = joinstring.parse(join)
    paths = AgentPaths(Path(data_dir))
    if paths.enrolled():
        raise ConfigError(f"--data-dir: {paths.root} is already enrolled; use another directory or remove it")
    if paths.root.exists() and not paths.root.is_dir():
        raise ConfigError(f"--data-dir: {paths.root} is not a directory")
    key = keys.generate(algorithm)
    resp = enroll_pinned(
        js.servers, js.trust_domain, js.fingerprint, {"token": js.secret, "csr": csr.build(key, None).decode()}, key
    )
    now = dt.datetime.now(dt.UTC)
    try:
        chain = tuple(certs.load_pem_chain(str(resp["certificate"]).encode(), what="issued certificate"))
        bundle = TrustBundle.from_pem(str(resp["bundle"]).encode())
    except (KeyError, TypeError, PKIError) as exc:
        raise PeerRejected(PeerReason.UNTRUSTED, f"server sent an unusable enrollment answer: {exc}") from exc
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
    log_event(log, "enrolled", spiffe_id=str(sid), not_after=creds.not_after, serial=certs.serial_hex(chain[0]))
    return creds


def _write(paths: AgentPaths, creds: Credentials, bundle: TrustBundle, ident: AgentIdentity) -> None:
    parent = paths.root.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tapproof-enroll-", dir=parent))
    try:
        t = AgentPaths(tmp)
        creds.save(t.key, t.cert)
        (t.bundle).write_bytes(bundle.to_pem())
        (t.identity).write_bytes(ident.to_toml())
        if not paths.root.exists():
            os.rename(tmp, paths.root)
            return
        for name in (t.key, t.cert, t.bundle, t.identity):  # identity last: it marks "enrolled"
            os.replace(name, paths.root / name.name)
        paths.root.chmod(0o700)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
