"""``tapproof audit pcap|live``: grade the encryption of every TCP flow in a capture.

Exit codes: 0 when the ``--fail-on`` condition is not met, 1 when it is, 2 on
bad input (missing or unreadable capture, unknown link type, bad flag).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from tapproof.audit.errors import AuditInputError
from tapproof.audit.html import GRADE_COLOURS, render_html
from tapproof.audit.live import capture_live
from tapproof.audit.pipeline import AuditResult, analyze
from tapproof.audit.report import FAIL_ON, build_report, fails
from tapproof.audit.verdict import GRADES

__all__ = ["register", "run_live", "run_pcap"]

_PROGRESS_MIN_BYTES = 64 * 1024 * 1024


def register(subparsers: Any) -> None:
    """Add ``audit`` and its subcommands to the top-level parser."""
    audit = subparsers.add_parser("audit", help="grade the encryption of every TCP flow in a capture")
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
        p.add_argument("--html", metavar="OUT", help="write a self-contained HTML report here")
        p.add_argument(
            "--fail-on",
            choices=sorted(FAIL_ON),
            help="exit 1 if any flow with payload is plaintext (F), below TLS 1.3 (tls12: C/D/F), "
            "not post-quantum (classical: B-F), or not proven PQ (undetermined: B-F and ?)",
        )
        p.add_argument("--top", type=int, default=20, metavar="N", help="links to list in the terminal (default 20)")
        p.add_argument("--quiet", action="store_true", help="no terminal report (outputs and exit code only)")

    pcap = sub.add_parser("pcap", help="analyse pcap/pcapng files")
    pcap.add_argument("files", nargs="+", metavar="FILE", help="pcap or pcapng capture files")
    outputs(pcap)
    pcap.set_defaults(func=run_pcap)

    live = sub.add_parser("live", help="capture with tcpdump for N seconds (root), then analyse")
    live.add_argument("--iface", required=True, metavar="IF", help="interface to capture on (e.g. eth0, lo)")
    live.add_argument("--seconds", type=float, default=30.0, metavar="N", help="capture duration (default 30)")
    live.add_argument("--filter", metavar="BPF", help="tcpdump capture filter, e.g. 'tcp port 5432'")
    outputs(live)
    live.set_defaults(func=run_live)


def run_pcap(args: argparse.Namespace) -> int:
    """Analyse capture files and report; return the exit code."""
    for path in args.files:
        if not os.path.isfile(path):
            raise AuditInputError(f"{path}: no such capture file")
    total = sum(os.path.getsize(p) for p in args.files)
    console = Console(stderr=True)
    if total >= _PROGRESS_MIN_BYTES and not args.quiet and console.is_terminal:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("reading captures", total=total)
            result = analyze(args.files, progress=lambda done, _t: bar.update(task, completed=done))
    else:
        result = analyze(args.files)
    return _finish(args, result)


def run_live(args: argparse.Namespace) -> int:
    """Capture live, analyse and report; return the exit code."""
    if os.geteuid() != 0:
        raise AuditInputError("audit live: needs root (packet capture)")
    if not args.quiet:
        Console(stderr=True).print(f"capturing on {args.iface} for {args.seconds:g} s ...")
    result = capture_live(args.iface, args.seconds, args.filter)
    return _finish(args, result)


def _write(path: str, text: str, flag: str) -> None:
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise AuditInputError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from exc


def _finish(args: argparse.Namespace, result: AuditResult) -> int:
    report = build_report(result)
    if args.json:
        _write(args.json, json.dumps(report, indent=1), "--json")
    if args.html:
        _write(args.html, render_html(report), "--html")
    err = Console(stderr=True)
    for w in report["summary"]["warnings"]:
        err.print(f"[yellow]warning:[/] {w} (the packets before it are reported)")
    if not args.quiet and args.json != "-":
        _print(Console(), report, args.top)
    if args.fail_on:
        bad = fails(report, args.fail_on)
        if bad:
            err.print(f"[red]fail-on {args.fail_on}:[/] {len(bad)} flow(s) meet the condition")
            return 1
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _g(grade: str) -> str:
    return f"[bold black on {GRADE_COLOURS[grade]}] {grade} [/]"


def _print(console: Console, report: dict[str, Any], top: int) -> None:
    s = report["summary"]
    cov = s["coverage"]
    table = Table(title="flows and bytes by grade")
    table.add_column("grade")
    table.add_column("flows", justify="right")
    table.add_column("bytes", justify="right")
    for g in reversed(GRADES):
        table.add_row(_g(g), str(s["by_grade"][g]["flows"]), _human(s["by_grade"][g]["bytes"]))
    console.print(table)

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    console.print(
        f"coverage: {pct(cov['bytes'])} of bytes and {pct(cov['flows'])} of flows encrypted; "
        f"post-quantum: {pct(cov['pq_bytes'])} of bytes; {s['flows']} flows, {s['packets']} packets"
    )
    links = Table(title=f"links, worst first (top {min(top, len(report['links']))} of {len(report['links'])})")
    for col in ("grade", "client", "server", "port", "protocols", "flows", "bytes"):
        links.add_column(col, justify="right" if col in ("port", "flows", "bytes") else "left")
    for link in report["links"][:top]:
        links.add_row(
            _g(link["grade"]),
            link["src"],
            link["dst"],
            str(link["dport"]),
            ", ".join(link["protocols"]),
            str(link["flows"]),
            _human(link["bytes"]),
        )
    console.print(links)
    plain = [f for f in report["flows"] if f["grade"] == "F" and f["sample"]][:top]
    if plain:
        samples = Table(title="why plaintext (redacted samples)")
        for col in ("client", "server", "port", "protocol", "sample"):
            samples.add_column(col)
        for f in plain:
            samples.add_row(f["src"], f["dst"], str(f["dport"]), f["protocol"], f["sample"])
        console.print(samples)
