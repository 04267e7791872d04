"""Grades: from a :class:`Classification` to a verdict a person can act on.

A = TLS 1.3 with a post-quantum hybrid group; B = TLS 1.3 classical;
C = TLS 1.2 with ECDHE and an AEAD cipher; D = other TLS, or SSH;
F = plaintext or broken crypto; ``?`` = not enough seen to say.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapproof.audit.classify import Classification
from tapproof.audit.groups import cipher_suite, group, tls_version_name

__all__ = ["ENCRYPTED_GRADES", "GRADES", "Verdict", "grade", "worst"]

GRADES = ("F", "?", "D", "C", "B", "A")  # worst first
ENCRYPTED_GRADES = frozenset("ABCD")
_RANK = {g: i for i, g in enumerate(GRADES)}

_PQ_SSH_KEX = ("sntrup761x25519", "mlkem768x25519", "mlkem768nistp256", "mlkem1024nistp384")


@dataclass(frozen=True, slots=True)
class Verdict:
    """``verdict`` is a short token, ``grade`` a letter, ``reason`` one sentence."""

    verdict: str  # encrypted-pq | encrypted | encrypted-legacy | plaintext | broken | undetermined
    grade: str
    reason: str


def worst(grades: list[str]) -> str:
    """The worst grade of a list (``?`` ranks between F and D)."""
    return min(grades, key=_RANK.__getitem__) if grades else "?"


def _tls(cl: Classification) -> Verdict:
    info = cl.tls
    if info is None or (cl.midstream and not info.server_hello):
        return Verdict("undetermined", "?", "tls records without the handshake: the flow started before the capture")
    if not info.server_hello:
        if info.alert is not None:
            return Verdict("undetermined", "?", f"tls handshake refused by alert {info.alert}; no session")
        return Verdict("undetermined", "?", "tls handshake not seen to the server hello")
    version = info.version or 0
    vname = tls_version_name(version)
    suite = cipher_suite(info.cipher or 0)
    g = group(info.group) if info.group is not None else None
    if suite.broken or version <= 0x0300:
        return Verdict("broken", "F", f"{vname} with {suite.name}: broken cryptography")
    if version == 0x0304 or (version >> 8) == 0x7F:
        if g is None:
            return Verdict("encrypted", "B", f"{vname} without a key share (psk only): no forward secrecy")
        if g.pq:
            return Verdict("encrypted-pq", "A", f"{vname} with {g.name}: post-quantum hybrid key exchange")
        return Verdict("encrypted", "B", f"{vname} with {g.name}: classical key exchange")
    if version == 0x0303 and suite.kx == "ECDHE" and suite.aead:
        return Verdict("encrypted-legacy", "C", f"{vname} ECDHE with AEAD ({suite.name})")
    return Verdict("encrypted-legacy", "D", f"{vname} with {suite.name}")


def grade(cl: Classification) -> Verdict:
    """Grade one classified flow."""
    p = cl.protocol
    if p == "tls":
        return _tls(cl)
    if p == "ssh":
        kex = cl.ssh_kex or "unknown"
        pq = any(kex.startswith(k) for k in _PQ_SSH_KEX)
        return Verdict("encrypted-legacy", "D", f"ssh (kex {kex}{', post-quantum' if pq else ''})")
    if p == "gssapi":
        return Verdict("undetermined", "?", "postgresql gssapi encryption: not graded")
    if p == "unknown-encrypted":
        return Verdict("undetermined", "?", "high-entropy bytes in no known framing: maybe encrypted, not provable")
    if p == "unknown":
        if cl.midstream:
            return Verdict("undetermined", "?", "too little seen: the flow started before the capture")
        return Verdict("undetermined", "?", "too little payload to classify")
    if p == "unknown-plaintext":
        return Verdict("plaintext", "F", "readable or low-entropy payload: not encrypted")
    return Verdict("plaintext", "F", f"plaintext {p}")
