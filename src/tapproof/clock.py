"""Time as an argument: a ``Clock`` protocol and the system clock.

Everything that decides with time takes ``now`` (a timezone-aware UTC
``datetime``) or a ``Clock``, so tests use :class:`tapproof.testing.FakeClock`
instead of sleeping.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time (for certificates) and monotonic time (for deadlines)."""

    def now(self) -> dt.datetime:
        """Return the current UTC time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Return seconds from an arbitrary origin, never going backwards."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        """Return the current UTC time."""
        return dt.datetime.now(dt.UTC)

    def monotonic(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()
