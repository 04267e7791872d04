"""OpenSSL certificate verification errors as tapproof refusal reasons (one table for agent and server).

A refused handshake logs and counts one reason; the generic ``untrusted`` is
kept for a chain that does not lead to the trust bundle (another CA, a broken
signature). Codes are OpenSSL's ``X509_V_ERR_*``.
"""

from __future__ import annotations

__all__ = ["VERIFY_REASONS", "verify_reason"]

VERIFY_REASONS = {
    9: "not-yet-valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    23: "revoked",  # CERT_REVOKED
    26: "bad-key-usage",  # INVALID_PURPOSE: no clientAuth/serverAuth or digitalSignature
    47: "wrong-trust-domain",  # PERMITTED_VIOLATION: URI outside the CA's name constraint
    48: "wrong-trust-domain",  # EXCLUDED_VIOLATION
    66: "weak-key",  # EE_KEY_TOO_SMALL (RSA-1024, ...)
    67: "weak-key",  # CA_KEY_TOO_SMALL
    68: "weak-signature",  # CA_MD_TOO_WEAK: SHA-1 or MD5 signature
}


def verify_reason(errno: int) -> str:
    """The refusal reason for OpenSSL verify error ``errno`` (``untrusted`` for the rest)."""
    return VERIFY_REASONS.get(errno, "untrusted")
