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


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
