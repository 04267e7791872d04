"""The soak's result as ``soak.json`` (everything, with the samples) and ``soak.md`` (the figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markdown(r: dict[str, Any]) -> str:
    """A short Markdown summary."""
    s = r["settings"]
    lines = [
        "# Soak",
        "",
        f"**{'PASS' if r['passed'] else 'FAIL'}** — {s['duration']:.0f} s, {s['streams']} long streams,"
        f" {s['rate']:g} new connections/s, leaf lifetime {s['leaf_ttl']} (renewal at {s['renew_fraction']:.2f}),"
        " a CA rotation at 40%, agent b killed (-9) and restarted at 65%. Two real agents and a control plane"
        f" on 127.0.0.1; load average at the end {r['load_average_end']} (a shared 2-core machine).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests ok (stream round trips + new connections) | {r['requests_ok']} |",
        f"| failures outside the fault window | {r['failures_outside_fault_window']} |",
        f"| failures inside the fault window | {r['failures_in_fault_window']} |",
        f"| stream bytes checked (both ways) | {r['stream_bytes_checked']} |",
        f"| new connections ok | {r['new_connections_ok']} |",
        f"| new connection p50 / p99 | {r['new_connection_p50_ms']} ms / {r['new_connection_p99_ms']} ms |",
        f"| renewals (a, b) | {r['renewals'].get('a', 0):g}, {r['renewals'].get('b', 0):g} |",
        f"| CA rotation | {_rotation(r['ca_rotation'])} |",
        f"| agent kill: tunnels again after | {r['agent_kill'].get('recovery_seconds', '-')} s |",
        "",
        "| process (life) | RSS first → last (max), MiB | RSS slope after warm-up, KiB/min | fds min-max (last) |"
        " threads max |",
        "|---|---|---|---|---|",
    ]
    for name, segments in r["processes"].items():
        for i, seg in enumerate(segments):
            life = f"{name}" + (f" (life {i + 1})" if len(segments) > 1 else "")
            lines.append(
                f"| {life} | {seg['rss_mib_first']} → {seg['rss_mib_last']} ({seg['rss_mib_max']}) |"
                f" {seg['rss_slope_kib_per_min']} | {seg['fds_min']}-{seg['fds_max']} ({seg['fds_last']}) |"
                f" {seg['threads_max']} |"
            )
    if r["problems"]:
        lines += ["", "## Problems", "", *[f"- {p}" for p in r["problems"]]]
    lines += ["", "## Events", "", *[f"- {e}" for e in r["events"]], ""]
    return "\n".join(lines)


def _rotation(rot: dict[str, Any]) -> str:
    if rot.get("status") == "done":
        return "done: " + ", ".join(f"{k} {rot[k]} s" for k in ("prepare", "activate", "retire") if k in rot)
    return f"{rot.get('status')}: {rot.get('detail', '')}"


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``soak.json`` and ``soak.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / "soak.json", out / "soak.md"
    jp.write_text(json.dumps(result, indent=1) + "\n")
    mp.write_text(markdown(result))
    return jp, mp
