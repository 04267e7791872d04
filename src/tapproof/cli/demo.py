"""``tapproof demo``: the before/after of a recording tap between two datacenters.

Exit 0 only if the tap read the canary without tapproof, did not read it with
tapproof, and every flow through tapproof negotiated TLS 1.3 + X25519MLKEM768.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.status import Status

from tapproof.demo.orchestrate import Demo, DemoOptions
from tapproof.demo.output import render
from tapproof.errors import ConfigError

__all__ = ["cmd_demo", "register"]


def register(sub: Any) -> None:
    """Add ``demo``."""
    p = sub.add_parser("demo", help="show a tap reading a secret, then reading nothing through tapproof")
    p.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="captures, audit reports, logs (default %(default)s)"
    )
    p.add_argument("--netns", action="store_true", help="(root) two network namespaces, tcpdump on the veth")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directories (debugging)")
    p.set_defaults(func=cmd_demo)


class _Progress:
    """Spinner while a step runs, a tick line when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status: Status | None = None

    def start(self, title: str) -> None:
        self.status = self.console.status(title)
        self.status.start()

    def done(self, title: str, seconds: float) -> None:
        if self.status is not None:
            self.status.stop()
        self.console.print(f"[green]✓[/] {title} [dim]({seconds:.1f}s)[/]")

    def failed(self, title: str, seconds: float) -> None:
        if self.status is not None:
            self.status.stop()
        self.console.print(f"[red]✗[/] {title} [dim]({seconds:.1f}s)[/]")

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when the story holds."""
    if args.netns and os.geteuid() != 0:
        raise ConfigError("--netns: needs root (network namespaces and tcpdump); run without it for the loopback demo")
    console = Console(highlight=False)
    progress = _Progress(console)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # same cleanup path as Ctrl-C

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        console.rule("[bold]tapproof demo[/]: a recording tap between two datacenters")
        result = Demo(DemoOptions(out=args.out, netns=args.netns, keep=args.keep), progress).run()
    finally:
        progress.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print()
    console.print(render(result))
    return 0 if result.ok else 1
