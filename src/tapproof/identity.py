"""SPIFFE IDs: exact parsing and formatting (pure).

tapproof's identities, all in one trust domain ``TD``:

* ``spiffe://TD/host/NAME``        an enrolled host (its agent)
* ``spiffe://TD/svc/NAME``         a service fronted by an agent
* ``spiffe://TD/tapproof/server``  a control-plane server
* ``spiffe://TD/tapproof/admin``   the operator's admin credential

Parsing is exact, after the SPIFFE ID standard: lower-case trust domain of
``[a-z0-9.-_]``, path segments of ``[A-Za-z0-9.-_]``, no empty segment, no
``.``/``..``, no trailing ``/``, no percent-encoding, no query or fragment,
at most 2048 bytes. Anything else is refused, never normalised: a peer
presenting ``spiffe://TD/host/a/../b`` or ``spiffe://TD/host/a%2Fb`` is not
``spiffe://TD/host/b``.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from tapproof.errors import ConfigError

MAX_ID_LENGTH = 2048
_TD = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
# Names of hosts and services: what users type; a strict subset of a segment.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Kind(enum.Enum):
    """What an identity names."""

    HOST = "host"
    SERVICE = "svc"
    SERVER = "server"
    ADMIN = "admin"
    OTHER = "other"


class InvalidSpiffeID(ConfigError):
    """A string that is not an exact, valid SPIFFE ID."""


@dataclasses.dataclass(frozen=True, order=True)
class SpiffeID:
    """A parsed SPIFFE ID. ``path`` is ``""`` or starts with ``/``."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def kind(self) -> Kind:
        """Classify the identity by its path."""
        segs = self.path.split("/")[1:]
        if len(segs) == 2 and segs[0] == "host":
            return Kind.HOST
        if len(segs) == 2 and segs[0] == "svc":
            return Kind.SERVICE
        if segs == ["tapproof", "server"]:
            return Kind.SERVER
        if segs == ["tapproof", "admin"]:
            return Kind.ADMIN
        return Kind.OTHER

    @property
    def name(self) -> str:
        """The host or service name (last path segment)."""
        return self.path.rsplit("/", 1)[-1]


def parse(text: str) -> SpiffeID:
    """Parse ``text`` exactly; raise :class:`InvalidSpiffeID` with the reason."""
    if not isinstance(text, str):
        raise InvalidSpiffeID("spiffe id must be a string")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
        raise InvalidSpiffeID("spiffe id is longer than 2048 bytes")
    scheme = "spiffe://"
    if not text.startswith(scheme):
        raise InvalidSpiffeID(f"not a spiffe id (must start with {scheme}): {text[:80]!r}")
    rest = text[len(scheme) :]
    td, slash, path = rest.partition("/")
    if not td:
        raise InvalidSpiffeID("spiffe id has an empty trust domain")
    if not _TD.match(td):
        raise InvalidSpiffeID(f"trust domain {td[:80]!r} has characters outside [a-z0-9.-_] (upper case is refused)")
    if not slash:
        return SpiffeID(td, "")
    path = "/" + path
    if path == "/":
        raise InvalidSpiffeID("spiffe id path must not end with '/'")
    for seg in path.split("/")[1:]:
        if seg == "":
            raise InvalidSpiffeID("spiffe id path has an empty segment or a trailing '/'")
        if seg in (".", ".."):
            raise InvalidSpiffeID("spiffe id path has a '.' or '..' segment")
        if not _SEGMENT.match(seg):
            raise InvalidSpiffeID(f"spiffe id path segment {seg[:40]!r} has characters outside [A-Za-z0-9.-_]")
    return SpiffeID(td, path)


def check_trust_domain(td: str) -> str:
    """Validate a trust domain name given by a user; return it."""
    if not _TD.match(td) or td.startswith(".") or td.endswith("."):
        raise ConfigError(f"--trust-domain: {td!r} is not a valid trust domain (lower-case DNS-like name)")
    return td


def check_name(name: str, *, what: str = "name") -> str:
    """Validate a host or service name (``[a-z0-9][a-z0-9._-]*``, <= 63 chars); return it."""
    if not _NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{what}: {name!r} is not a valid name (lower-case letters, digits, '.', '-', '_'; "
            "starts with a letter or digit; at most 63 characters)"
        )
    return name


def host_id(td: str, name: str) -> SpiffeID:
    """``spiffe://TD/host/NAME``."""
    return SpiffeID(check_trust_domain(td), "/host/" + check_name(name, what="host"))


def service_id(td: str, name: str) -> SpiffeID:
    """``spiffe://TD/svc/NAME``."""
    return SpiffeID(check_trust_domain(td), "/svc/" + check_name(name, what="service"))


def server_id(td: str) -> SpiffeID:
    """``spiffe://TD/tapproof/server``."""
    return SpiffeID(check_trust_domain(td), "/tapproof/server")


def admin_id(td: str) -> SpiffeID:
    """``spiffe://TD/tapproof/admin``."""
    return SpiffeID(check_trust_domain(td), "/tapproof/admin")
