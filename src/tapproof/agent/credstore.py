"""The agent's live credentials and the TLS contexts built from them, swapped atomically.

A :class:`Material` is immutable: the key and chain, the trust bundle, and one
server and one client context built from them ONCE (a context per connection
would cost a chain parse and a key load per tunnel). Every new connection takes
the current material with one attribute read; a renewal or a bundle change
builds a whole new :class:`Material` and swaps the reference. Live connections
keep the ``SSL`` objects (and through them the contexts) they started with, so
a swap never touches them.

A candidate that fails (key/chain mismatch, unparsable bundle, a context that
cannot be built) is refused and the current material stays in place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading

from OpenSSL import SSL

from tapproof.agent.state import AgentPaths, load_bundle, load_credentials
from tapproof.logs import log_event
from tapproof.pki import certs
from tapproof.tls import context, unsafe
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.tls.reasons import verify_reason

log = logging.getLogger(__name__)

__all__ = ["CredStore", "Material", "take_verify_error"]

_verify = threading.local()


def _verify_hook(errno: int, _depth: int, ok: bool) -> None:
    """Called by OpenSSL's verify callback in the handshaking thread: remember the first error."""
    if not ok and getattr(_verify, "errno", 0) == 0:
        _verify.errno = errno


def take_verify_error() -> str | None:
    """The reason for this thread's last failed peer verification (then cleared), or None."""
    errno = getattr(_verify, "errno", 0)
    _verify.errno = 0
    if errno == 0:
        return None
    return verify_reason(errno)


@dataclasses.dataclass(frozen=True)
class Material:
    """One generation of credentials, bundle and the contexts built from them."""

    creds: Credentials
    bundle: TrustBundle
    server_ctx: SSL.Context
    client_ctx: SSL.Context
    serial: str

    @property
    def not_after(self) -> dt.datetime:
        """When our certificate expires."""
        return self.creds.not_after

    @classmethod
    def build(cls, creds: Credentials, bundle: TrustBundle, *, unsafe_classical_groups: bool = False) -> Material:
        """Build both contexts (raises on anything unusable: nothing is swapped then).

        ``unsafe_classical_groups`` (``--unsafe-classical-groups``) lets both also
        negotiate classical groups (see :mod:`tapproof.tls.unsafe`)."""
        server_ctx = context.server_context(creds, bundle, require_client_cert=True, hook=_verify_hook, resumption=True)
        client_ctx = context.client_context(creds, bundle, hook=_verify_hook, resumption=True)
        if unsafe_classical_groups:
            unsafe.allow_classical_groups(server_ctx)
            unsafe.allow_classical_groups(client_ctx)
        return cls(creds, bundle, server_ctx, client_ctx, certs.serial_hex(creds.leaf))


class CredStore:
    """Holds the current :class:`Material`; readers never lock, writers swap under a lock."""

    def __init__(self, paths: AgentPaths, *, unsafe_classical_groups: bool = False) -> None:
        self.paths = paths
        self.unsafe_classical_groups = unsafe_classical_groups
        self._lock = threading.Lock()
        self._material = Material.build(
            load_credentials(paths), load_bundle(paths), unsafe_classical_groups=unsafe_classical_groups
        )
        self.generation = 1
        """Bumped on every swap."""

    @property
    def current(self) -> Material:
        """The material new connections use."""
        return self._material

    def client_context(self) -> SSL.Context:
        """The current client context (also the control-plane API client's)."""
        return self._material.client_ctx

    def swap(self, creds: Credentials | None = None, bundle: TrustBundle | None = None) -> Material:
        """Build new material from ``creds``/``bundle`` (default: the current ones) and swap it in."""
        with self._lock:
            old = self._material
            new = Material.build(
                creds or old.creds, bundle or old.bundle, unsafe_classical_groups=self.unsafe_classical_groups
            )
            self._material = new
            self.generation += 1
        log_event(
            log,
            "credentials-swapped",
            serial=new.serial,
            previous_serial=old.serial,
            not_after=new.not_after,
            bundle=list(new.bundle.fingerprints),
        )
        return new

    def reload_from_disk(self) -> Material:
        """Load key, chain and bundle from the data dir and swap them in (after a renewal)."""
        return self.swap(load_credentials(self.paths), load_bundle(self.paths))
