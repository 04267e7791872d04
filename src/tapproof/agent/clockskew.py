"""Clock skew between this host and the control plane, measured at enrollment and at each renewal.

Certificates are short-lived, so a wrong clock breaks tunnels in confusing ways
("certificate has expired", "not yet valid", renewals at every round). The
agent measures the skew on every answer that issues it a certificate and
refuses, with reason ``clock-skew``, once it exceeds ``--max-clock-skew``
(default :data:`DEFAULT_MAX_SKEW`):

* from the answer's HTTP ``Date`` header (the API sends one on every answer):
  the server's time against our clock around the request; whole seconds, so
  the uncertainty is the round trip plus one second;
* from the issued certificate, when there is no usable ``Date`` header:
  ``notBefore`` is the issuance time minus :data:`tapproof.pki.certs.BACKDATE`.

The default equals the server's ``notBefore`` backdate (5 minutes): an agent
behind by more sees fresh certificates of its peers as not yet valid.
:func:`measure` and :func:`check` are pure; :func:`observe` records the last
measurement (``tapproof_agent_clock_skew_seconds``) and :func:`refused` logs
the refusal (event ``clock-skew``, reason ``clock-skew``) and counts it
(``tapproof_agent_clock_skew_refusals_total{at}``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import logging

from prometheus_client import Counter, Gauge

from tapproof.errors import ClockSkewError
from tapproof.logs import log_event
from tapproof.pki.certs import BACKDATE
from tapproof.units import format_duration

__all__ = ["DEFAULT_MAX_SKEW", "Skew", "check", "enforce", "measure", "observe", "refused"]

log = logging.getLogger(__name__)
SKEW = Gauge("tapproof_agent_clock_skew_seconds", "Our clock minus the control plane's, at the last issuance")
REFUSED = Counter("tapproof_agent_clock_skew_refusals", "Certificates refused for clock skew", ["at"])

DEFAULT_MAX_SKEW = dt.timedelta(minutes=5)
"""Default ``--max-clock-skew``: the server's notBefore backdate."""


@dataclasses.dataclass(frozen=True)
class Skew:
    """Our clock minus the control plane's (positive: we are ahead), and how it was measured."""

    offset: dt.timedelta
    source: str  # "date-header" or "certificate"
    uncertainty: dt.timedelta

    @property
    def seconds(self) -> float:
        """The offset in seconds."""
        return self.offset.total_seconds()

    def describe(self) -> str:
        """``2h0m ahead of`` / ``3m behind`` the control plane's clock."""
        word = "ahead of" if self.seconds > 0 else "behind"
        return f"{format_duration(dt.timedelta(seconds=round(abs(self.seconds))))} {word}"


def _parse_date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(dt.UTC)


def measure(
    sent: dt.datetime, received: dt.datetime, date_header: str | None, not_before: dt.datetime | None = None
) -> Skew | None:
    """The skew from one answer: ``sent``/``received`` are our clock around the request.

    The ``Date`` header wins (the server stamps it when it answers); without
    one, the issued certificate's ``notBefore`` (+ backdate) stands in. None
    when there is neither.
    """
    server = _parse_date(date_header)
    rtt = max(dt.timedelta(0), received - sent)
    if server is not None:
        mid = sent + rtt / 2
        # Date is truncated to the second: the server's true time is in [server, server + 1 s)
        offset = mid - (server + dt.timedelta(milliseconds=500))
        return Skew(offset, "date-header", rtt / 2 + dt.timedelta(milliseconds=500))
    if not_before is not None:
        issued = not_before + BACKDATE
        return Skew(received - issued, "certificate", rtt + dt.timedelta(seconds=1))
    return None


def check(skew: Skew | None, limit: dt.timedelta, *, when: str) -> None:
    """Raise :class:`ClockSkewError` when ``skew`` is beyond ``limit`` (minus its uncertainty)."""
    if skew is None or limit <= dt.timedelta(0):
        return
    if abs(skew.offset) - skew.uncertainty <= limit:
        return
    raise ClockSkewError(
        skew.seconds,
        f"clock-skew at {when}: this host's clock is {skew.describe()} the control plane's "
        f"(measured from its {skew.source.replace('-', ' ')}; limit --max-clock-skew {format_duration(limit)}); "
        "fix this host's time (NTP, chrony or systemd-timesyncd) and start the agent again",
    )


def observe(skew: Skew | None) -> None:
    """Record the last measurement in the gauge."""
    if skew is not None:
        SKEW.set(round(skew.seconds, 3))


def refused(exc: ClockSkewError, *, at: str) -> None:
    """Log (one structured line with the reason) and count a clock-skew refusal."""
    REFUSED.labels(at).inc()
    log_event(
        log, "clock-skew", level=logging.ERROR, reason=exc.reason, at=at, skew_seconds=round(exc.skew_seconds, 1),
        detail=str(exc),
    )  # fmt: skip


def enforce(skew: Skew | None, limit: dt.timedelta, *, at: str) -> None:
    """Observe ``skew``, then :func:`check` it; a refusal is logged and counted (:func:`refused`) and re-raised."""
    observe(skew)
    try:
        check(skew, limit, when=at)
    except ClockSkewError as exc:
        refused(exc, at=at)
        raise
