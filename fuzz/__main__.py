"""``python -m fuzz [--seconds N] [TARGET ...]``: run every fuzz target for a bounded time (``make fuzz``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fuzz.runner import run
from fuzz.targets import TARGETS


def main(argv: list[str] | None = None) -> int:
    """Run the named (or all) targets; exit 1 on the first crash (saved under fuzz/crashes/)."""
    ap = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    ap.add_argument("targets", nargs="*", choices=[*TARGETS, []], help="targets (default: all)")
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)  # refusals are logged by design; here they are noise
    for name in args.targets or list(TARGETS):
        factory, seeds = TARGETS[name]
        try:
            n = run(factory(), seeds, seconds=args.seconds, seed=args.seed, crash_dir=Path("fuzz/crashes") / name)
        except Exception as exc:  # noqa: BLE001 - report which target crashed; the input is saved
            print(f"{name}: CRASH {type(exc).__name__}: {exc} (input saved under fuzz/crashes/{name})")
            return 1
        print(f"{name}: {n} inputs, no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
