"""CPU time and resident memory of process trees, from /proc (Linux only).

A tunnel "process" may fork workers (socat forks per connection; a data plane may
use several worker processes), so every figure is summed over the tree rooted
at each given PID: live descendants are found through ``/proc/*/stat`` ppids,
and the CPU time of children that already exited is in their parent's
``cutime``/``cstime`` once reaped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

TICK = float(os.sysconf("SC_CLK_TCK"))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def tree(roots: Iterable[int]) -> list[int]:
    """The given PIDs and all their live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [r for r in roots if os.path.exists(f"/proc/{r}")]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (an exited, not yet reaped process is not alive)."""
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU seconds of the trees (own time plus reaped children's)."""
    total = 0
    for pid in tree(roots):
        f = _stat_fields(pid)
        if f is not None:
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / TICK


def rss_kib(roots: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) over the trees (shared pages count once per process)."""
    total = 0
    for pid in tree(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def threads(roots: Iterable[int]) -> int:
    """Number of threads over the trees."""
    total = 0
    for pid in tree(roots):
        f = _stat_fields(pid)
        if f is not None:
            total += int(f[17])
    return total


def listening(port: int) -> bool:
    """True when something listens on 127.0.0.1/0.0.0.0 ``port`` (read from /proc/net/tcp, no connection made)."""
    want = f":{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[1].endswith(want):
                    return True
    except OSError:
        return False
    return False
