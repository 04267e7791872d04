"""A TCP accept loop that hands each connection to a worker thread and never blocks on one.

The accept loop only accepts: handshakes, preambles and relays run in the
worker (one thread per connection; the relay's C calls release the GIL).
A handler may also offer a ``fast`` path, tried in the accept loop itself: it
takes the connection only when it can do so without blocking (an agent with a
ready mux connection hands the socket to that connection's event loop), and
saves the thread start that otherwise bounds how fast one loop accepts (such
connections hold no worker slot: the mux connection's stream cap bounds them). A
bounded number of workers caps memory under a connection flood: past it, a
new connection is closed at once and reported (reason ``too-many-connections``).
Used by the agent's listeners and the control plane's API server.

Scale (10,000 tunnels per agent): each tunnel costs one thread and two file
descriptors. :func:`raise_limits` (called at agent start) raises the
open-file soft limit to the hard limit and makes thread stacks
:data:`STACK_SIZE` (the default 8 MiB only costs address space, but 10,000 of
them look alarming and count against overcommit); :data:`MAX_WORKERS` caps
handlers per listener.

Every refusal (``too-many-connections``, ``no-worker``) is counted
(``on_refuse``) and logged as one structured line (event
``connection-refused`` with its reason); under a flood the lines are
rate-limited to one per :data:`LOG_EVERY` seconds per reason, and the next
line says how many were not logged (``suppressed``).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable

from tapproof.errors import TransportError
from tapproof.logs import log_event
from tapproof.units import format_hostport

log = logging.getLogger(__name__)

__all__ = ["MAX_WORKERS", "STACK_SIZE", "Listener", "bind", "raise_limits"]

MAX_WORKERS = 16384
"""Concurrent connections (handshaking or relaying) per listener."""

STACK_SIZE = 512 * 1024
"""Stack of every thread started after :func:`raise_limits` (handshake, relay: a few KiB used)."""


def raise_limits() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit and shrink new thread stacks; return the fd limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    with contextlib.suppress(ValueError, RuntimeError):
        threading.stack_size(STACK_SIZE)
    return int(soft)


LOG_EVERY = 1.0
"""Seconds between two ``connection-refused`` lines of one reason (the rest are counted, then summarised)."""

Handler = Callable[[socket.socket, tuple[str, int]], None]
FastPath = Callable[[socket.socket, tuple[str, int]], bool]
"""Takes the connection without blocking and returns True, or returns False (a worker thread takes it)."""
OnRefuse = Callable[[str], None]


def bind(host: str, port: int, *, what: str, backlog: int = 1024) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: the kernel picks), SO_REUSEADDR."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"{what}: cannot listen on {format_hostport(host, port)}: {exc.strerror}") from exc
    return sock


class Listener:
    """Accept on ``sock`` and run ``handler(conn, addr)`` in a thread per connection."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        name: str,
        on_refuse: OnRefuse | None = None,
        max_workers: int = MAX_WORKERS,
        fast: FastPath | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.fast = fast
        self.name = name
        self.on_refuse = on_refuse or (lambda _reason: None)
        self._slots = threading.BoundedSemaphore(max_workers)
        self._active = 0
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._logged: dict[str, float] = {}  # reason -> monotonic time of its last line
        self._suppressed: dict[str, int] = {}  # reason -> refusals not logged since
        self._thread = threading.Thread(target=self._loop, name=f"accept-{name}", daemon=True)
        host, port = sock.getsockname()[:2]
        self.address = format_hostport(str(host), int(port))
        """The bound address (``HOST:PORT``)."""

    def start(self) -> None:
        """Start accepting."""
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while the accept loop runs."""
        return self._thread.is_alive() and not self._stop.is_set()

    def _loop(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    break
                log_event(log, "accept-failed", level=logging.WARNING, listener=self.name, detail=str(exc))
                self._stop.wait(0.05)
                continue
            if self.fast is not None and self._try_fast(conn, addr):
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse("too-many-connections", addr)
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            conn.settimeout(None)
            t = threading.Thread(target=self._run, args=(conn, addr), name=f"conn-{self.name}", daemon=True)
            try:
                t.start()
            except RuntimeError:  # cannot start a thread: refuse this one
                self._slots.release()
                self._refuse("no-worker", addr)
                with contextlib.suppress(OSError):
                    conn.close()

    def _try_fast(self, conn: socket.socket, addr: tuple[str, int]) -> bool:
        assert self.fast is not None  # noqa: S101 - checked by the caller
        try:
            return self.fast(conn, addr)
        except Exception:  # a bug must not kill the accept loop; the connection is dropped, not leaked
            log.exception("connection-fast-path-crashed", extra={"event": "handler-crashed", "listener": self.name})
            with contextlib.suppress(OSError):
                conn.close()
            return True

    def _refuse(self, reason: str, addr: tuple[str, int]) -> None:
        """Count a refused connection; log it (one line per reason per :data:`LOG_EVERY` seconds)."""
        self.on_refuse(reason)
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_EVERY) < LOG_EVERY:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._logged[reason] = now
        log_event(
            log,
            "connection-refused",
            level=logging.WARNING,
            reason=reason,
            listener=self.name,
            source=format_hostport(str(addr[0]), int(addr[1])) if addr else "",
            suppressed=self._suppressed.pop(reason, 0),
        )

    def _run(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        with self._idle:
            self._active += 1
        try:
            self.handler(conn, addr)
        except Exception:  # a bug in a handler must not kill the agent; the handler closed what it owns
            log.exception("connection-handler-crashed", extra={"event": "handler-crashed", "listener": self.name})
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._slots.release()
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for running handlers to finish; True if none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def stop(self) -> None:
        """Stop accepting and close the listening socket (live connections continue)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() at once (Linux)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        with contextlib.suppress(OSError):
            self.sock.close()
