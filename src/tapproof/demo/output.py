"""The demo's terminal output: the before/after table and the verdict (rich renderables, no printing here)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tapproof.demo.inspect import PQ_GROUP
from tapproof.demo.orchestrate import DemoResult, RunResult

__all__ = ["render"]

_GRADE_STYLE = {"A": "bold green", "B": "green", "C": "yellow", "D": "red", "F": "bold red"}


def _yes(flag: bool, *, good: bool) -> Text:
    word = "YES" if flag else "no"
    return Text(word, style="bold green" if flag == good else "bold red")


def _join(items: list[str]) -> str:
    return ", ".join(items) if items else "-"


def _column(run: RunResult) -> list[RenderableType]:
    c = run.capture
    group = Text(_join(c.groups), style="bold green" if c.pq else "")
    return [
        run.path,
        _yes(c.canary_seen, good=False),
        _yes(run.client_got_canary, good=True),
        f"{c.bytes:,} bytes, {c.packets} packets, {c.flows} flows",
        _join(c.protocols),
        _join(c.tls_versions),
        group,
        Text(c.grade, style=_GRADE_STYLE.get(c.grade, "")),
        Text(c.excerpt or "-", style="red" if c.canary_seen else "dim"),
        str(c.path),
    ]


def render(result: DemoResult) -> RenderableType:
    """The table comparing the runs, and a one-line verdict."""
    table = Table(title=f"what the tap recorded ({result.mode})", show_lines=True, title_style="bold")
    table.add_column("", style="bold")
    for run in result.runs:
        table.add_column(run.title, overflow="fold")
    rows = [
        "path of the bytes",
        "canary seen by the tap",
        "client got its answer",
        "captured",
        "protocol",
        "TLS version",
        "key exchange group",
        "auditor grade",
        "what the tap reads",
        "capture file",
    ]
    columns = [_column(r) for r in result.runs]
    for i, label in enumerate(rows):
        table.add_row(label, *(col[i] for col in columns))
    parts: list[RenderableType] = [table]
    if len(result.runs) == 2 and result.runs[1].agent_groups:
        parts.append(Text(f"agents report the negotiated group: {_join(result.runs[1].agent_groups)}", style="dim"))
    if result.ok:
        verdict = Text.assemble(
            ("PASS ", "bold green"),
            f"without tapproof the tap read {result.canary}; with tapproof it read nothing, "
            f"and every flow was TLS 1.3 with {PQ_GROUP} ({result.seconds:.1f}s).",
        )
        parts.append(Panel(verdict, border_style="green"))
    else:
        lines = Text("FAIL\n", style="bold red")
        for f in result.failures:
            lines.append(f"- {f}\n")
        lines.append(f"logs: {result.out / 'logs'}", style="dim")
        parts.append(Panel(lines, border_style="red"))
    parts.append(Text(f"check it yourself: tapproof audit pcap {result.out}/run*.pcap", style="dim"))
    return Group(*parts)
