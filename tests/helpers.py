"""Test-tier plumbing shared by every test module.

``require(cond, reason)`` skips a test whose prerequisite (root, PostgreSQL,
tcpdump, ...) is missing, except under ``TAPPROOF_FULL=1`` (what ``.ci/run``
sets), where the missing prerequisite is a failure: nothing silently skips in CI.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

FULL = os.environ.get("TAPPROOF_FULL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip (or, under TAPPROOF_FULL=1, fail) unless ``condition`` holds."""
    if condition:
        return
    if FULL:
        pytest.fail(f"TAPPROOF_FULL=1 but the test cannot run: {reason}")
    pytest.skip(reason)


def is_root() -> bool:
    """True when running as root."""
    return os.geteuid() == 0


def require_root() -> None:
    """The test needs root."""
    require(is_root(), "needs root")


def require_tool(*names: str) -> None:
    """The test needs these executables on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"needs {', '.join(missing)} on PATH")


def free_port(host: str = "127.0.0.1", *, hold: bool = True) -> int:
    """Return a TCP port that is free on ``host``, for a program that binds it a little later.

    With ``hold`` (the default) the port is left with a connection in TIME_WAIT, which keeps the
    kernel from handing it to any other ``bind(0)`` or outgoing connection for about 60 s (tests
    that start many listeners on a busy machine otherwise collide), while a server that binds it
    with SO_REUSEADDR (tapproof, Python's http.server and prometheus_client, PostgreSQL, redis,
    ``openssl s_server``) still can. Pass ``hold=False`` for a program that binds without it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the TIME_WAIT entry inherits it
        s.bind((host, 0))
        port = int(s.getsockname()[1])
        if hold:
            s.listen(1)
            with socket.create_connection((host, port), timeout=5):
                conn, _ = s.accept()
                conn.close()  # the accepting side closes first: its TIME_WAIT holds ``port``
        return port
