"""Fakes for tests (no mocks): a controllable clock, and more as the suite grows."""

from __future__ import annotations

import datetime as dt


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
        self._mono = 1000.0

    def now(self) -> dt.datetime:
        """Return the fake wall-clock time."""
        return self._now

    def monotonic(self) -> float:
        """Return the fake monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        self._now += dt.timedelta(seconds=seconds)
        self._mono += seconds
