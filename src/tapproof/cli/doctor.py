"""``tapproof doctor``: check this host (agent and/or server) and print what to fix."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapproof.doctor import Report, Status
from tapproof.doctor.run import Options, run
from tapproof.errors import ConfigError
from tapproof.units import parse_duration

_STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red", Status.SKIP: "dim"}


def register(sub: Any) -> None:
    """Add ``doctor``."""
    p = sub.add_parser(
        "doctor",
        help="check this host: clock, certificates, bundle, rules, ports, control plane",
        description="Checks an agent data dir (--data-dir) and/or a server data dir (--server-data-dir) and "
        "prints OK/WARN/FAIL with what to fix. Exit 0 unless a check FAILs (then 1); 2 on bad flags.",
    )
    p.add_argument("--data-dir", type=Path, help="the agent's data directory (e.g. /var/lib/tapproof-agent)")
    p.add_argument("--config", type=Path, help="the agent's --config TOML (tells its mode when it is not running)")
    p.add_argument("--admin", help="the agent's admin HOST:PORT (default: from its run file, else 127.0.0.1:7445)")
    p.add_argument("--server-data-dir", type=Path, help="a control-plane data directory on this host")
    p.add_argument("--timeout", default="5s", help="per network call (default 5s)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Run the checks and print them."""
    if args.data_dir is None and args.server_data_dir is None:
        raise ConfigError("--data-dir: give an agent data dir, a --server-data-dir, or both")
    timeout = parse_duration(args.timeout, what="--timeout").total_seconds()
    if not 0 < timeout <= 60:
        raise ConfigError("--timeout: must be between 1s and 60s")
    report = run(
        Options(
            agent_dir=args.data_dir,
            config=args.config,
            admin=args.admin,
            server_dir=args.server_data_dir,
            timeout=timeout,
        )
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        _table(report)
    return report.exit_code


def _table(report: Report) -> None:
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
    table = Table(title="tapproof doctor", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("found")
    table.add_column("what to do")
    for c in report.checks:
        table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status.value}[/]", escape(c.summary), escape(c.fix))
    console.print(table)
    counts = report.counts()
    verdict = "[bold red]FAIL[/]" if report.failed else ("[yellow]WARN[/]" if counts["WARN"] else "[green]OK[/]")
    console.print(
        f"{verdict}: {counts['OK']} ok, {counts['WARN']} warning(s), {counts['FAIL']} failure(s), "
        f"{counts['SKIP']} skipped"
    )
