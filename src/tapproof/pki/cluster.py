"""CA state shared by every server of one database: roots, per-server intermediates, requests.

Where things are:

* root certificates, with their rotation state: the store (``trust_roots``);
* root private keys: only where ``server init`` / ``server ca rotate prepare``
  ran, as ``D/ca/root.key`` (the first) and ``D/ca/roots/<fp16>.key`` (later
  ones). They sign intermediates and nothing else, so they can be moved
  offline and brought back (``--root-key FILE``) to sign;
* each server's intermediate key: ``D/ca/intermediate.key`` of that server
  (a pending one ``D/ca/intermediate.next.key``); its certificates, one per
  root that certified the key: the store (``ca_intermediates``), cached in
  ``D/ca/intermediate.crt``;
* a server without a certificate for its key queues a CSR in the store
  (``ca_requests``); whoever has the root key signs it with
  ``tapproof server ca sign-intermediate``.

An intermediate's subject is derived from its server and key, so a second
certificate for the same key under a new root (what ``rotate prepare``
makes) certifies the same leaves: leaves chain to either root through the
intermediate certificate the server attaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tapproof.errors import ConfigError, Conflict, NotFound, PKIError
from tapproof.fsutil import ensure_private_dir, read_bytes, write_atomic
from tapproof.logs import log_event
from tapproof.pki import certs, keys
from tapproof.pki.ca import ROOT_LIFETIME, CAPaths, LocalCA, create_ca
from tapproof.store.base import CARequestRecord, IntermediateRecord, Store, TrustRootRecord

log = logging.getLogger(__name__)

INTERMEDIATE_LIFETIME = dt.timedelta(days=90)


def key_id(public: certs.PublicKey) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER (which key a certificate or request is for)."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def label(server: str, kid: str) -> str:
    """The intermediate's subject label: the same for every certificate of one key."""
    return f"{server} {kid[:12]}"


def next_key_path(paths: CAPaths) -> Path:
    """``D/ca/intermediate.next.key``: a key waiting for its certificate."""
    return paths.dir / "intermediate.next.key"


def roots_dir(paths: CAPaths) -> Path:
    """``D/ca/roots``: root keys made by rotations."""
    return paths.dir / "roots"


def root_certs(store: Store) -> dict[str, x509.Certificate]:
    """Every root in the bundle, by fingerprint."""
    out = {}
    for r in store.list_trust_roots():
        out[r.fingerprint] = certs.load_pem_chain(r.cert_pem.encode(), what="trust root")[0]
    return out


def find_root_keys(data_dir: Path, roots: dict[str, x509.Certificate], extra: Sequence[Path] = ()) -> dict[str, Any]:
    """The root private keys present (data dir and ``extra`` files) for the roots given, by fingerprint."""
    paths = CAPaths(Path(data_dir))
    candidates = [paths.root_key, *sorted(roots_dir(paths).glob("*.key")), *extra]
    by_pub = {key_id(cast("certs.PublicKey", c.public_key())): fp for fp, c in roots.items()}
    found: dict[str, Any] = {}
    for path in candidates:
        if not path.exists():
            if path in extra:
                raise ConfigError(f"--root-key: {path} does not exist")
            continue
        key = keys.load(path, what="root key")
        fp = by_pub.get(key_id(key.public_key()))
        if fp is not None:
            found[fp] = key
        elif path in extra:
            raise ConfigError(f"--root-key: {path} is not the key of any root in the trust bundle")
    return found


def _record(server: str, cert: x509.Certificate, root_fp: str, now: dt.datetime) -> IntermediateRecord:
    return IntermediateRecord(
        fingerprint=certs.fingerprint(cert),
        server=server,
        key_id=key_id(cast("certs.PublicKey", cert.public_key())),
        root=root_fp,
        cert_pem=certs.to_pem(cert).decode(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        created_at=now,
    )


def sign_for(
    public: certs.PublicKey,
    server: str,
    root: x509.Certificate,
    root_key: Any,
    trust_domain: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> tuple[x509.Certificate, IntermediateRecord]:
    """Certify ``public`` as ``server``'s intermediate under ``root``."""
    kid = key_id(public)
    cert = certs.make_intermediate(public, root_key, root, trust_domain, label(server, kid), now, lifetime)
    return cert, _record(server, cert, certs.fingerprint(root), now)


# --- the first server -----------------------------------------------------------------------------
def bootstrap(
    data_dir: Path,
    store: Store,
    trust_domain: str,
    server: str,
    now: dt.datetime,
    algorithm: keys.Algorithm = "ecdsa-p256",
    lifetime: dt.timedelta = INTERMEDIATE_LIFETIME,
) -> LocalCA:
    """Root + this server's intermediate in ``D/ca``, and both in the store (the root ``active``)."""
    ca = create_ca(
        data_dir,
        trust_domain,
        now,
        algorithm,
        lambda int_key, root, root_key: sign_for(
            int_key.public_key(), server, root, root_key, trust_domain, now, lifetime
        )[0],
    )
    store.add_trust_root(TrustRootRecord(certs.fingerprint(ca.root), certs.to_pem(ca.root).decode(), "active", now))
    store.add_intermediate(_record(server, ca.intermediate, certs.fingerprint(ca.root), now))
    return ca


# --- a server joining (or rotating without the root key) -------------------------------------------
def request(data_dir: Path, store: Store, server: str, now: dt.datetime, algorithm: keys.Algorithm) -> CARequestRecord:
    """Make ``D/ca/intermediate.next.key`` (kept if it exists) and queue its CSR in the store."""
    paths = CAPaths(Path(data_dir))
    ensure_private_dir(paths.dir)
    nk = next_key_path(paths)
    key = keys.load(nk, what="pending intermediate key") if nk.exists() else keys.generate(algorithm)
    if not nk.exists():
        keys.save(key, nk)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tapproof intermediate {server}")]))
        .sign(key, cast("Any", keys.signing_hash(key)))
    )
    rec = CARequestRecord(key_id(key.public_key()), server, csr.public_bytes(serialization.Encoding.PEM).decode(), now)
    with contextlib.suppress(Conflict):  # already queued
        store.add_ca_request(rec)
    return rec


def sign_requests(
    store: Store,
    trust_domain: str,
    root_keys: dict[str, Any],
    now: dt.datetime,
    lifetime: dt.timedelta = INTERMEDIATE_LIFETIME,
) -> list[IntermediateRecord]:
    """Sign every queued request under every active or prepared root whose key is in ``root_keys``.

    A request is dropped once signed under the active root; a request whose
    CSR signature does not verify is dropped unsigned (and logged).
    """
    roots = {r.fingerprint: r for r in store.list_trust_roots()}
    usable = [fp for fp, r in roots.items() if r.state in ("active", "prepared") and fp in root_keys]
    active = next((fp for fp, r in roots.items() if r.state == "active"), None)
    done: list[IntermediateRecord] = []
    for req in store.list_ca_requests():
        try:
            csr = x509.load_pem_x509_csr(req.csr_pem.encode())
        except ValueError:
            csr = None
        if csr is None or not csr.is_signature_valid:
            log_event(log, "ca-request-dropped", level=logging.WARNING, server=req.server, reason="bad-csr")
            store.remove_ca_request(req.key_id)
            continue
        public = cast("certs.PublicKey", csr.public_key())
        if key_id(public) != req.key_id:
            log_event(log, "ca-request-dropped", level=logging.WARNING, server=req.server, reason="key-mismatch")
            store.remove_ca_request(req.key_id)
            continue
        have = {(i.root) for i in store.list_intermediates(req.server) if i.key_id == req.key_id}
        for fp in usable:
            if fp in have:
                continue
            root = certs.load_pem_chain(roots[fp].cert_pem.encode())[0]
            _cert, rec = sign_for(public, req.server, root, root_keys[fp], trust_domain, now, lifetime)
            store.add_intermediate(rec)
            done.append(rec)
            have.add(fp)
        if active in have:
            with contextlib.suppress(NotFound):
                store.remove_ca_request(req.key_id)
    return done


def sign_keys_under(
    store: Store,
    trust_domain: str,
    root: x509.Certificate,
    root_key: Any,
    now: dt.datetime,
    lifetime: dt.timedelta = INTERMEDIATE_LIFETIME,
) -> list[IntermediateRecord]:
    """Certify under ``root`` every intermediate key still in use (an unexpired certificate) that has none."""
    root_fp = certs.fingerprint(root)
    ints = store.list_intermediates()
    have = {i.key_id for i in ints if i.root == root_fp}
    done: list[IntermediateRecord] = []
    for i in reversed(ints):  # newest first: one certificate per key
        if i.not_after <= now or i.key_id in have:
            continue
        cert = certs.load_pem_chain(i.cert_pem.encode())[0]
        _c, rec = sign_for(
            cast("certs.PublicKey", cert.public_key()), i.server, root, root_key, trust_domain, now, lifetime
        )
        store.add_intermediate(rec)
        done.append(rec)
        have.add(i.key_id)
    return done


def new_root(
    data_dir: Path, trust_domain: str, now: dt.datetime, algorithm: keys.Algorithm = "ecdsa-p256"
) -> tuple[x509.Certificate, Any, Path]:
    """A new root; its key saved in ``D/ca/roots/<fp16>.key``."""
    paths = CAPaths(Path(data_dir))
    key = keys.generate(algorithm)
    root = certs.make_root(key, trust_domain, now, ROOT_LIFETIME)
    ensure_private_dir(roots_dir(paths))
    path = roots_dir(paths) / f"{certs.fingerprint(root)[:16]}.key"
    keys.save(key, path)
    return root, key, path


# --- what a running server uses -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Selection:
    """The CA a server issues with, and what it knows about its own intermediate."""

    ca: LocalCA
    intermediate: IntermediateRecord
    roots: dict[str, x509.Certificate]  # the bundle
    active: str  # fingerprint of the active root
    request_pending: bool


def _adopt_files(
    paths: CAPaths, store: Store, server: str, roots: dict[str, x509.Certificate], now: dt.datetime
) -> None:
    """A data dir from before schema v2: record its intermediate certificate in the store."""
    if not paths.int_cert.exists():
        return
    cert = certs.load_pem_chain(read_bytes(paths.int_cert, what="intermediate certificate"))[0]
    for fp, root in roots.items():
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        with contextlib.suppress(Conflict):
            store.add_intermediate(_record(server, cert, fp, now))
        log_event(log, "intermediate-adopted", server=server, fingerprint=certs.fingerprint(cert)[:16])
        return


def select(data_dir: Path, store: Store, trust_domain: str, server: str, now: dt.datetime) -> Selection:
    """Pick this server's intermediate: its key's certificate under the active root (else under
    any root of the bundle), promoting a pending key once its certificate is there."""
    paths = CAPaths(Path(data_dir))
    if paths.int_cert.exists():  # a cache of the store, but a damaged one means a damaged data dir: fail closed
        try:
            certs.load_pem_chain(read_bytes(paths.int_cert, what="intermediate certificate"))
        except PKIError as exc:
            raise ConfigError(f"--data-dir: corrupt CA in {paths.dir}: {exc}") from exc
    records = store.list_trust_roots()
    roots = {r.fingerprint: certs.load_pem_chain(r.cert_pem.encode(), what="trust root")[0] for r in records}
    active = next((r.fingerprint for r in records if r.state == "active"), None)
    if active is None:
        raise ConfigError("--db: the database holds no active root: run `tapproof server init` on it first")
    mine = store.list_intermediates(server)
    if not mine:
        _adopt_files(paths, store, server, roots, now)
        mine = store.list_intermediates(server)
    nk = next_key_path(paths)
    if nk.exists():
        pending = keys.load(nk, what="pending intermediate key")
        pid = key_id(pending.public_key())
        if any(i.key_id == pid and i.root == active and i.not_after > now for i in mine):
            os.replace(nk, paths.int_key)  # promote: the next key becomes the current one
            log_event(log, "intermediate-key-promoted", server=server, key_id=pid[:16])
    if not paths.int_key.exists():
        raise ConfigError(
            f"--data-dir: {paths.dir} has no intermediate key yet: its request waits for "
            "`tapproof server ca sign-intermediate` where the root key is"
        )
    key = keys.load(paths.int_key, what="intermediate key")
    kid = key_id(key.public_key())
    usable = [i for i in mine if i.key_id == kid and i.root in roots and i.not_after > now]
    if not usable:
        raise ConfigError(
            f"--data-dir: no valid intermediate certificate for server {server!r}: "
            "run `tapproof server ca sign-intermediate` where the root key is"
        )
    usable.sort(key=lambda i: (i.root == active, i.not_after))
    chosen = usable[-1]
    inter = certs.load_pem_chain(chosen.cert_pem.encode())[0]
    if not paths.int_cert.exists() or read_bytes(paths.int_cert, what="intermediate") != chosen.cert_pem.encode():
        write_atomic(paths.int_cert, chosen.cert_pem.encode())
    pending_ids = {r.key_id for r in store.list_ca_requests() if r.server == server}
    ca = LocalCA(trust_domain, roots[chosen.root], inter, key)
    return Selection(ca, chosen, roots, active, bool(pending_ids))
