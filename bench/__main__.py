"""``python -m bench [NAME ...] [ARGS]``: run benchmarks, each bounded in time.

* ``peers``  (the default) tapproof side by side with plaintext, stunnel, spiped, socat and
             haproxy: throughput, conn/s, latency, CPU per GB, RSS per idle tunnel (``bench/peers/``)
* ``relay``  the data-plane relay design measurement (``bench/relay_speed.py``)
* ``audit``  ``tapproof audit pcap`` vs ``tshark -z conv,tcp`` on a generated >= 1 GB capture
* ``scale``  N simulated agents enroll and renew against 1 and 2 servers on SQLite and PostgreSQL
             (``bench/scale.py``; not in ``all``: ``python -m bench scale --hosts 10000`` takes a while)
* ``all``    relay, audit, then peers

Arguments after the names (or after ``--``) go to every named benchmark, e.g.
``python -m bench --runs 3``, ``python -m bench peers --quick``, ``python -m bench relay -- --runs 1``.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "peers": "bench.peers.main",
    "relay": "bench.relay_speed",
    "audit": "bench.audit_speed",
    "scale": "bench.scale",
}
DEFAULT = ["peers"]
ALL = ["relay", "audit", "peers"]


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmarks in order; stop at the first failure."""
    args = sys.argv[1:] if argv is None else argv
    names: list[str] = []
    i = 0
    while i < len(args) and (args[i] in BENCHES or args[i] == "all"):
        names += ALL if args[i] == "all" else [args[i]]
        i += 1
    extra = args[i:]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    elif not names and any(a in ("-h", "--help") for a in extra):
        print(__doc__)
        return 0
    elif extra and not extra[0].startswith("-"):
        print(f"unknown benchmark {extra[0]!r}; choose from {', '.join(BENCHES)} or all", file=sys.stderr)
        return 2
    for name in names or DEFAULT:
        print(f"=== bench {name}", flush=True)
        rc = int(importlib.import_module(BENCHES[name]).main(extra))
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
