"""Suite-wide hooks: under TAPPROOF_FULL=1 every unexpected skip is a failure."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.helpers import FULL

# One private PostgreSQL per session, shared by every test package (see tests/pgserver.py).
pytest_plugins = ["tests.pgserver"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Turn skips into failures under TAPPROOF_FULL=1, unless marked ``allowed_skip``."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if FULL and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("allowed_skip") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under TAPPROOF_FULL=1 (nothing may skip in CI): {reason}"
