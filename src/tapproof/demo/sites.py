"""Where the demo's processes run: on this host (loopback) or inside a network namespace.

Every process is started through a :class:`Site`, which keeps its ``Popen``
so that :meth:`Site.stop_all` ends exactly the processes the demo started, by
PID, newest first (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tapproof.testing.netns import Host, stop_process

__all__ = ["LocalSite", "NetnsSite", "Site", "tapproof_argv"]


def tapproof_argv(*args: str) -> list[str]:
    """``python -m tapproof ARGS`` with this interpreter (works from a venv without PATH set)."""
    return [sys.executable, "-m", "tapproof", *args]


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Site:
    """A place to run processes; this base runs them directly on the host."""

    def __init__(self, name: str, address: str = "127.0.0.1") -> None:
        """``address`` is what other sites dial to reach this one."""
        self.name = name
        self.address = address
        self.procs: list[subprocess.Popen[bytes]] = []

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` at this site."""
        return list(argv)

    def popen(self, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process, output to ``log``; it is stopped by :meth:`stop_all`."""
        full = dict(os.environ)
        full.update(env or {})
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                self.wrap(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full
            )
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion (bounded by ``timeout``); output captured."""
        full = dict(os.environ)
        full.update(env or {})
        return subprocess.run(
            self.wrap(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=full,
            stdin=subprocess.DEVNULL,
        )

    def stop_all(self) -> None:
        """Stop every process started here, newest first."""
        while self.procs:
            stop_process(self.procs.pop(), grace=5.0)


class LocalSite(Site):
    """Processes run on this host; everything listens on 127.0.0.1."""


class NetnsSite(Site):
    """Processes run inside a network namespace of a :class:`~tapproof.testing.netns.Lab`."""

    def __init__(self, name: str, host: Host) -> None:
        """Wrap ``host``; its lab address is what the other site dials."""
        super().__init__(name, host.address)
        self.host = host

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``ip netns exec NS argv``."""
        return self.host.exec_argv(argv)
