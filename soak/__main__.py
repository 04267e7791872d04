"""``python -m soak [--duration 10m] [--out bench/results]``: run the soak, write JSON + Markdown, exit 1 on failure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from soak.report import write
from soak.scenario import Settings, run
from tapproof.errors import ConfigError
from tapproof.units import parse_duration


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run, report."""
    ap = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    ap.add_argument("--duration", default="10m", help="how long the load runs (default %(default)s; e.g. 150s)")
    ap.add_argument("--out", default="bench/results", help="directory for soak.json and soak.md (default %(default)s)")
    ap.add_argument("--streams", type=int, default=50, help="long streams (default %(default)s)")
    ap.add_argument("--rate", type=float, default=20.0, help="new connections per second (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        seconds = parse_duration(args.duration, what="--duration").total_seconds()
    except ConfigError as exc:
        ap.error(str(exc))
    result = run(Settings(duration=seconds, streams=args.streams, rate=args.rate))
    json_path, md_path = write(result, Path(args.out))
    console = Console()
    console.print(f"soak: {'[green]PASS' if result['passed'] else '[red]FAIL'}[/]; {json_path} {md_path}")
    for problem in result["problems"]:
        console.print(f"  problem: {problem}", markup=False)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
