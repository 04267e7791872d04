"""``python -m bench [NAME ...] [-- ARGS]``: run benchmarks (all by default), each bounded in time.

* ``relay``  the data-plane relay design measurement (``bench/relay_speed.py``)
* ``audit``  ``tapproof audit pcap`` vs ``tshark -z conv,tcp`` on a generated >= 1 GB capture
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {"relay": "bench.relay_speed", "audit": "bench.audit_speed"}


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmarks in order; stop at the first failure."""
    args = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1 :]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    unknown = [a for a in args if a not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    for name in args or list(BENCHES):
        print(f"=== bench {name}", flush=True)
        rc = int(importlib.import_module(BENCHES[name]).main(extra))
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
