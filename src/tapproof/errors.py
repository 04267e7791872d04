"""The whole error tree of tapproof.

::

    TapproofError
    ├── ConfigError                bad flag, config key, data dir or join string
    │   ├── JoinStringError        malformed, tampered or unsupported join string
    │   ├── InvalidSpiffeID        (identity.py) not an exact SPIFFE ID
    │   └── AuditInputError        (audit/errors.py) unreadable or corrupt capture
    ├── PKIError                   CA, CSR and certificate problems
    │   ├── CSRRejected            a CSR we refuse to sign (reason: CSRReason)
    │   ├── PeerRejected           a peer certificate or handshake we refuse (reason: PeerReason)
    │   └── ClockSkewError         this host's clock is too far from the control plane's
    ├── ProtocolError              bytes that break a protocol
    │   ├── LocalProtocolError     we broke it (a bug on our side)
    │   └── RemoteProtocolError    the peer broke it
    │       └── TLSParseError      (audit/errors.py) bytes the auditor's TLS parser refuses
    ├── TransportError             connect/handshake/IO failures, timeouts
    │   └── HandshakeTimeout
    ├── APIError                   the control plane answered with an error (status, code)
    ├── EnrollmentRefused          a join token unknown, expired, used, or for a revoked host
    ├── TransparentError           (agent/transparent.py) iptables rules could not be changed
    ├── DemoError                  (demo/orchestrate.py) a demo step failed
    ├── NetnsError                 (testing/netns.py) a test namespace could not be set up
    └── StoreError                 storage problems
        ├── NotFound
        ├── Conflict               a uniqueness conflict (e.g. a duplicate serial or token hash)
        ├── SchemaMismatch         the database schema is newer/older than this code knows
        └── StoreUnavailable       the database cannot be reached right now

Only the CLI turns these into exit codes and messages. Tests assert on types
and ``reason`` enums, never on message strings. A peer learns little (one
opaque refusal); the local log learns everything.
"""

from __future__ import annotations

import enum


class TapproofError(Exception):
    """Base of every error tapproof raises on purpose."""


class ConfigError(TapproofError):
    """A flag, config key, environment variable or data dir is wrong."""


class JoinStringError(ConfigError):
    """A join string is malformed, tampered with, or of an unknown version."""


class PKIError(TapproofError):
    """Certificate authority, CSR or certificate problems."""


class CSRReason(enum.Enum):
    """Why a certificate signing request was refused."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad-signature"
    WEAK_KEY = "weak-key"
    IDENTITY_MISMATCH = "identity-mismatch"
    KEY_MISMATCH = "key-mismatch"  # not the key of the TLS client certificate (enrollment)


class CSRRejected(PKIError):
    """A CSR that the CA refuses to sign."""

    def __init__(self, reason: CSRReason, detail: str) -> None:
        super().__init__(f"csr rejected ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


class PeerReason(enum.Enum):
    """Why a peer (certificate, handshake or group) was refused."""

    NO_CERTIFICATE = "no-certificate"
    UNTRUSTED = "untrusted"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    REVOKED = "revoked"
    BAD_SPIFFE_ID = "bad-spiffe-id"
    WRONG_TRUST_DOMAIN = "wrong-trust-domain"
    WRONG_IDENTITY = "wrong-identity"
    BAD_KEY_USAGE = "bad-key-usage"
    CA_AS_LEAF = "ca-as-leaf"
    WEAK_KEY = "weak-key"
    WEAK_SIGNATURE = "weak-signature"
    NOT_PQ = "not-post-quantum"
    NOT_TLS13 = "not-tls13"
    FINGERPRINT_MISMATCH = "fingerprint-mismatch"
    HANDSHAKE_FAILED = "handshake-failed"


class PeerRejected(PKIError):
    """A peer we refuse; ``reason`` says why (for logs and metrics, not for the peer)."""

    def __init__(self, reason: PeerReason, detail: str) -> None:
        super().__init__(f"peer rejected ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


class ClockSkewError(PKIError):
    """This host's clock differs from the control plane's by more than ``--max-clock-skew``."""

    reason = "clock-skew"

    def __init__(self, skew_seconds: float, message: str) -> None:
        super().__init__(message)
        self.skew_seconds = skew_seconds


class ProtocolError(TapproofError):
    """Bytes that break a protocol."""


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class TransportError(TapproofError):
    """Connecting, handshaking, reading or writing failed."""


class HandshakeTimeout(TransportError):
    """The TLS handshake did not finish before its deadline."""


class APIError(TapproofError):
    """The control plane answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (http {status}, {code})")
        self.status = status
        self.code = code
        self.message = message


class StoreError(TapproofError):
    """The store (SQLite or PostgreSQL) failed."""


class NotFound(StoreError):
    """The record does not exist."""


class Conflict(StoreError):
    """A uniqueness or state conflict: duplicate name, token already used, ..."""


class SchemaMismatch(StoreError):
    """The database schema version is not the one this code knows."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or read right now (retry later)."""


class TokenReason(enum.Enum):
    """Why a join token was not accepted."""

    UNKNOWN = "unknown-token"
    EXPIRED = "expired-token"
    USED = "used-token"
    HOST_REVOKED = "host-revoked"


class EnrollmentRefused(TapproofError):
    """A join token that cannot be redeemed; ``reason`` says why."""

    def __init__(self, reason: TokenReason, detail: str = "") -> None:
        super().__init__(f"enrollment refused ({reason.value}){': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail
