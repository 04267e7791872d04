"""Structured doctor results: one :class:`Check` per finding, a :class:`Report` for the host."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

__all__ = ["Check", "Report", "Status"]


class Status(enum.Enum):
    """Outcome of one check; only FAIL changes the exit code."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not checked: not applicable, or an earlier failure hides it


@dataclasses.dataclass(frozen=True)
class Check:
    """One finding: ``summary`` says what was seen, ``fix`` what to do (empty when OK)."""

    name: str
    status: Status
    summary: str
    fix: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "status": self.status.value,
            "summary": self.summary,
            "fix": self.fix,
            "details": self.details,
        }


def ok(name: str, summary: str, **details: Any) -> Check:
    """An OK check."""
    return Check(name, Status.OK, summary, "", details)


def warn(name: str, summary: str, fix: str, **details: Any) -> Check:
    """A WARN check (works now, needs attention)."""
    return Check(name, Status.WARN, summary, fix, details)


def fail(name: str, summary: str, fix: str, **details: Any) -> Check:
    """A FAIL check (broken now)."""
    return Check(name, Status.FAIL, summary, fix, details)


def skip(name: str, summary: str, **details: Any) -> Check:
    """A check that could not or need not run."""
    return Check(name, Status.SKIP, summary, "", details)


@dataclasses.dataclass(frozen=True)
class Report:
    """Every check for one host."""

    checks: tuple[Check, ...]

    @classmethod
    def of(cls, checks: Sequence[Check]) -> Report:
        """Build from a sequence."""
        return cls(tuple(checks))

    @property
    def failed(self) -> bool:
        """True when any check FAILed."""
        return any(c.status is Status.FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 unless a check FAILed (then 1); WARN and SKIP keep 0."""
        return 1 if self.failed else 0

    def counts(self) -> dict[str, int]:
        """How many checks per status."""
        return {s.value: sum(1 for c in self.checks if c.status is s) for s in Status}

    def get(self, name: str) -> Check:
        """The check called ``name`` (KeyError if absent)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``ok``, ``counts``, ``checks``."""
        return {"ok": not self.failed, "counts": self.counts(), "checks": [c.to_json() for c in self.checks]}
