"""The one explicit weakening of the TLS contexts: ``--unsafe-classical-groups``.

By default every context offers and accepts only X25519MLKEM768, so a client
whose TLS library has no ML-KEM (OpenSSL 3.0's ``s_client``, sslyze's
bundled OpenSSL) is refused. This switch adds classical groups after the PQ
one (a tapproof peer still negotiates X25519MLKEM768; a classical-only peer
gets X25519), so that such tools can inspect the rest of the configuration.
A tap recording those classical sessions today can read them once a quantum
computer exists: the switch is never a default, and callers log it at
warning on every start and show it in their status and metrics.
"""

from __future__ import annotations

import weakref

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tapproof.errors import PKIError

__all__ = ["CLASSICAL_GROUPS", "WARNING", "allow_classical_groups", "classical_allowed"]

CLASSICAL_GROUPS = "X25519MLKEM768:X25519:P-256:P-384"
WARNING = (
    "--unsafe-classical-groups is ON: peers without ML-KEM may connect with a classical key exchange "
    "that a future quantum computer can break; use it only to let a scanner inspect this port"
)

_UNSAFE: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def allow_classical_groups(ctx: SSL.Context) -> SSL.Context:
    """Let ``ctx`` negotiate classical groups too (PQ stays first); return it."""
    if _lib.SSL_CTX_set1_curves_list(ctx._context, CLASSICAL_GROUPS.encode()) != 1:
        raise PKIError(f"this OpenSSL refuses the group list {CLASSICAL_GROUPS}")
    _UNSAFE.add(ctx)
    return ctx


def classical_allowed(ctx: SSL.Context) -> bool:
    """True if ``ctx`` was made unsafe by :func:`allow_classical_groups`."""
    return ctx in _UNSAFE
