"""``tapproof doctor``: check a host and say what to fix.

Three layers, so the decisions are testable without sockets or clocks:

* :mod:`tapproof.doctor.result`: :class:`Check` (name, OK/WARN/FAIL/SKIP, one-line
  summary, what to fix, details) and :class:`Report` (exit code, JSON);
* :mod:`tapproof.doctor.checks`: sans-I/O evaluations of observed facts
  (validity windows, clock skew, iptables listings, probe outcomes);
* :mod:`tapproof.doctor.probe` gathers those facts (files, the agent's admin
  endpoint, the control-plane API over mutual TLS, ``iptables -S``, TCP connects)
  and :mod:`tapproof.doctor.run` wires facts to evaluations.
"""

from tapproof.doctor.result import Check, Report, Status

__all__ = ["Check", "Report", "Status"]
