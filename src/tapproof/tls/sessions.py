"""Client-side TLS 1.3 session store for tunnel resumption (see :mod:`tapproof.tls.context`).

Sessions are kept DETACHED, as DER bytes: OpenSSL marks a live ``SSL_SESSION``
not resumable when the connection that owns it ends without a clean shutdown
(every aborted tunnel), which would silently turn every later attempt into a
full handshake. A copy decoded per connection is unaffected.

Entries are keyed by peer and belong to one credential generation (the object
passed as ``generation``, the agent's current credential material): the first
use under another generation empties the store, so a renewal, a rotation or a
bundle change on OUR side forces full handshakes (the far side does the same
through its session id context). Entries expire after ``lifetime`` seconds and
the store holds at most ``max_entries`` peers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tapproof.tls.context import TICKET_LIFETIME

__all__ = ["SessionStore", "was_resumed"]


def was_resumed(conn: SSL.Connection) -> bool:
    """True if ``conn``'s handshake resumed a session (no certificates were exchanged)."""
    return bool(_lib.SSL_session_reused(conn._ssl))


def _session_der(conn: SSL.Connection) -> bytes | None:
    sess = _lib.SSL_get1_session(conn._ssl)
    if sess == _ffi.NULL:
        return None
    try:
        n = _lib.i2d_SSL_SESSION(sess, _ffi.NULL)
        if n <= 0:
            return None
        buf = _ffi.new("unsigned char[]", n)
        _lib.i2d_SSL_SESSION(sess, _ffi.new("unsigned char **", buf))
        return bytes(_ffi.buffer(buf, n))
    finally:
        _lib.SSL_SESSION_free(sess)


class SessionStore:
    """Detached sessions per peer for one credential generation at a time (thread-safe)."""

    def __init__(
        self,
        *,
        lifetime: float = TICKET_LIFETIME - 10,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._generation: object = None
        self._entries: OrderedDict[Hashable, tuple[bytes, float]] = OrderedDict()

    def _switch(self, generation: object) -> None:
        if generation is not self._generation:
            self._generation = generation
            self._entries.clear()

    def offer(self, conn: SSL.Connection, generation: object, peer: Hashable) -> bool:
        """Set a stored session on ``conn`` (before its handshake); True if one was set."""
        with self._lock:
            self._switch(generation)
            entry = self._entries.get(peer)
            if entry is None:
                return False
            der, expires = entry
            if self._clock() >= expires:
                del self._entries[peer]
                return False
        buf = _ffi.new("unsigned char[]", der)
        sess = _lib.d2i_SSL_SESSION(_ffi.NULL, _ffi.new("unsigned char **", buf), len(der))
        if sess == _ffi.NULL:
            _lib.ERR_clear_error()
            self.forget(generation, peer)
            return False
        try:
            return bool(_lib.SSL_set_session(conn._ssl, sess) == 1)
        finally:
            _lib.SSL_SESSION_free(sess)

    def save(self, conn: SSL.Connection, generation: object, peer: Hashable) -> None:
        """Keep ``conn``'s latest session (call after reading from the peer: tickets come post-handshake)."""
        der = _session_der(conn)
        if der is None:
            return
        with self._lock:
            self._switch(generation)
            self._entries[peer] = (der, self._clock() + self.lifetime)
            self._entries.move_to_end(peer)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, generation: object, peer: Hashable) -> None:
        """Drop ``peer``'s session (after a failed or refused connection)."""
        with self._lock:
            if generation is self._generation:
                self._entries.pop(peer, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
