"""Sockets inside a network namespace from the test process itself (no helper process).

The network namespace is per thread on Linux: :func:`in_netns` moves the
calling thread into a namespace of a :class:`tapproof.testing.netns.Lab`
with ``setns(2)`` and back. A socket keeps the namespace it was created in,
so :class:`~tests.battery.invariants.HashEcho` and the sockets passed to
:func:`~tests.battery.invariants.stream` can be made inside and used from any
thread. Never start a process inside the block (it would inherit the namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block's socket calls in namespace ``name`` (``ip netns`` name); the thread returns after."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def connect(name: str, addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``addr`` made from inside namespace ``name``."""
    with in_netns(name):
        return socket.create_connection(addr, timeout=timeout)
