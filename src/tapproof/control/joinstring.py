"""Join strings: ONE string that lets an agent enroll and trust the server (pure).

Format: ``tpj1.<payload>.<check>`` where ``payload`` is base64url (no padding)
of compact JSON ``{"s": [servers], "t": trust domain, "f": root fingerprint,
"k": secret}`` and ``check`` is base64url of the first 6 bytes of
SHA-256(payload): a mistyped or truncated string is refused as corrupted
before anything is sent. The secret is 32 random bytes (256 bits); the server
stores only SHA-256(secret).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
import secrets

from tapproof.errors import ConfigError, JoinStringError
from tapproof.identity import check_trust_domain
from tapproof.units import parse_hostport

PREFIX = "tpj1"
MAX_LENGTH = 4096
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")  # base64url of 32 bytes


@dataclasses.dataclass(frozen=True)
class JoinString:
    """What an agent needs to enroll: where, whom to trust, and the one-time secret."""

    servers: tuple[str, ...]
    trust_domain: str
    fingerprint: str
    secret: str

    def __repr__(self) -> str:  # never print the secret
        return (
            f"JoinString(servers={self.servers!r}, trust_domain={self.trust_domain!r}, "
            f"fingerprint={self.fingerprint!r})"
        )

    def encode(self) -> str:
        """The string users copy."""
        body = {"s": list(self.servers), "t": self.trust_domain, "f": self.fingerprint, "k": self.secret}
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{PREFIX}.{payload}.{_check(payload)}"

    @property
    def token_hash(self) -> str:
        """SHA-256 of the secret, as stored by the server."""
        return hash_secret(self.secret)


def new_secret() -> str:
    """256 random bits, base64url."""
    return _b64(secrets.token_bytes(32))


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a token secret."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise JoinStringError("join string is corrupted (invalid characters)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JoinStringError("join string is corrupted (bad encoding)") from exc


def _check(payload: str) -> str:
    return _b64(hashlib.sha256(payload.encode("ascii")).digest()[:6])


def parse(text: str) -> JoinString:
    """Parse and validate a join string; raise :class:`JoinStringError` naming the problem."""
    if not isinstance(text, str):
        raise JoinStringError("--join: not a string")
    text = text.strip()
    if len(text) > MAX_LENGTH:
        raise JoinStringError(f"--join: longer than {MAX_LENGTH} characters")
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        if parts and parts[0].startswith("tpj") and parts[0] != PREFIX:
            raise JoinStringError(f"--join: unsupported join string version {parts[0][:8]!r}")
        raise JoinStringError("--join: not a tapproof join string (expected tpj1.<payload>.<check>)")
    _, payload, check = parts
    if not re.fullmatch(r"[A-Za-z0-9_-]+", payload) or not re.fullmatch(r"[A-Za-z0-9_-]{8}", check):
        raise JoinStringError("--join: join string is corrupted (invalid characters)")
    if check != _check(payload):
        raise JoinStringError("--join: join string is corrupted or was modified (checksum mismatch)")
    try:
        body = json.loads(_unb64(payload))
    except (ValueError, UnicodeDecodeError) as exc:
        raise JoinStringError("--join: join string payload is not valid") from exc
    if not isinstance(body, dict) or set(body) != {"s", "t", "f", "k"}:
        raise JoinStringError("--join: join string payload has unexpected fields")
    servers, td, fp, secret = body["s"], body["t"], body["f"], body["k"]
    if not isinstance(servers, list) or not servers or len(servers) > 16:
        raise JoinStringError("--join: join string must list 1 to 16 servers")
    for s in servers:
        if not isinstance(s, str):
            raise JoinStringError("--join: server address is not a string")
        try:
            parse_hostport(s, what="--join server")
        except ConfigError as exc:
            raise JoinStringError(f"--join: {exc}") from exc
    if not isinstance(td, str):
        raise JoinStringError("--join: trust domain is not a string")
    try:
        check_trust_domain(td)
    except ConfigError as exc:
        raise JoinStringError(f"--join: bad trust domain {td[:64]!r}") from exc
    if not isinstance(fp, str) or not _HEX64.match(fp):
        raise JoinStringError("--join: CA fingerprint must be 64 lower-case hex characters")
    if not isinstance(secret, str) or not _SECRET.match(secret):
        raise JoinStringError("--join: secret is malformed")
    return JoinString(tuple(servers), td, fp, secret)
