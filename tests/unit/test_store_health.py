"""The store's up/down tracking: one log line per transition from a state this process saw."""

from __future__ import annotations

import logging

import pytest

from tapproof.store.engine import _Health


def _events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "event", r.getMessage())) for r in caplog.records if r.name == "tapproof.store.engine"]


def test_failure_before_any_success_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tapproof.store.engine")
    h = _Health()
    h.mark(False, "open", "file is not a database")  # a server starting on a corrupt file: the caller reports it
    h.mark(False, "open", "file is not a database")
    assert _events(caplog) == []
    h.mark(True, "read", "")  # first success: no store-up either (nothing was announced down)
    assert _events(caplog) == []


def test_transitions_after_a_success_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tapproof.store.engine")
    h = _Health()
    h.mark(True, "read", "")
    h.mark(False, "issue", "unable to open database file")
    h.mark(False, "issue", "unable to open database file")
    h.mark(True, "issue", "")
    h.mark(True, "issue", "")
    assert _events(caplog) == ["store-down", "store-up"]
