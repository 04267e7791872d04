"""Summaries of the measured runs: medians, ratios to stunnel, the issue-5 targets, Markdown and JSON."""

from __future__ import annotations

import statistics
from typing import Any

# key, column title, unit, higher is better
METRICS: list[tuple[str, str, str, bool]] = [
    ("tput_1_gbps", "iperf3 1 stream", "Gbit/s", True),
    ("tput_4_gbps", "iperf3 4 streams", "Gbit/s", True),
    ("cps_c1", "conn/s c=1", "/s", True),
    ("cps_c8", "conn/s c=8", "/s", True),
    ("rtt_p50_us", "RTT p50", "us", False),
    ("rtt_p99_us", "RTT p99", "us", False),
    ("rtt_p999_us", "RTT p99.9", "us", False),
    ("cpu_s_per_gb", "CPU-s per GB", "s", False),
    ("cores_4_streams", "cores, 4 streams", "", True),
    ("rss_per_tunnel_step1_kib", "RSS/tunnel @{1}", "KiB", False),
    ("rss_per_tunnel_step2_kib", "RSS/tunnel @{2}", "KiB", False),
    ("rss_step2_mib", "RSS @{2}", "MiB", False),
    ("idle_held_step2", "idle tunnels held (of {2})", "", True),
]
BASE = "stunnel"
PEERS = ("stunnel", "haproxy")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def summarize(runs: list[dict[str, dict[str, Any]]], setups: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per setup and metric: median, min, max and count over the runs that produced a number."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in setups:
        out[name] = {}
        for key, *_ in METRICS:
            vals = [x for r in runs if (x := _num(r.get(name, {}).get(key))) is not None]
            if vals:
                out[name][key] = {
                    "median": statistics.median(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
    return out


def ratios(runs: list[dict[str, dict[str, Any]]], setups: list[str]) -> dict[str, dict[str, float]]:
    """Per setup and metric: the median over runs of (value / stunnel's value in the same run)."""
    out: dict[str, dict[str, float]] = {}
    for name in setups:
        out[name] = {}
        for key, *_ in METRICS:
            rs = []
            for r in runs:
                v, b = _num(r.get(name, {}).get(key)), _num(r.get(BASE, {}).get(key))
                if v is not None and b:
                    rs.append(v / b)
            if rs:
                out[name][key] = round(statistics.median(rs), 3)
    return out


def _med(summary: dict[str, dict[str, dict[str, float]]], name: str, key: str) -> float | None:
    return summary.get(name, {}).get(key, {}).get("median")


_KEYS = (("tapproof", ("tapproof", "met")), ("tapproof-mux", ("tapproof_mux", "mux_met")))
"""Each tapproof setup and the keys of its value and verdict in a target row."""


def targets(
    summary: dict[str, dict[str, dict[str, float]]], groups: dict[str, Any], steps: list[int]
) -> list[dict[str, Any]]:
    """The issue-5 targets against the best TLS peer (stunnel or haproxy), from medians.

    Each row has the default agent's figure (``tapproof``, ``met``) and, when it
    ran, the ``--mux`` agent's (``tapproof_mux``, ``mux_met``): the two data paths
    trade throughput against connection rate and idle memory.
    """
    rows: list[dict[str, Any]] = []
    mine = [n for n in ("tapproof", "tapproof-mux") if n in summary]
    if not mine:
        return rows
    peers = [p for p in PEERS if p in summary]

    def best(key: str, higher: bool) -> tuple[float | None, str]:
        vals = [(v, p) for p in peers if (v := _med(summary, p, key)) is not None]
        if not vals:
            return None, "-"
        return max(vals) if higher else min(vals)

    def add(what: str, need: float | None, peer: str, value: Any, ok: Any) -> None:
        """``value(name)`` and ``ok(v)`` per tapproof setup."""
        row: dict[str, Any] = {"target": what, "needed": need, "best_peer": peer}
        for name, (vkey, mkey) in _KEYS:
            v = value(name) if name in mine else None
            row[vkey] = v
            row[mkey] = None if v is None else ok(v)
        rows.append(row)

    for key, label in (("tput_1_gbps", "throughput 1 stream"), ("tput_4_gbps", "throughput 4 streams")):
        b, p = best(key, True)
        need = 1.5 * b if b is not None else None
        add(
            f"{label} >= 1.5x best TLS peer (Gbit/s)",
            need,
            p,
            lambda n, k=key: _med(summary, n, k),
            lambda v, need=need: None if need is None else v >= need,
        )
    for key, label in (("cps_c1", "conn/s c=1"), ("cps_c8", "conn/s c=8")):
        b, p = best(key, True)
        need = 3 * b if b is not None else None
        add(
            f"{label} >= 3x best TLS peer",
            need,
            p,
            lambda n, k=key: _med(summary, n, k),
            lambda v, need=need: None if need is None else v >= need,
        )
    for key, label in (("rtt_p50_us", "added RTT p50 (us)"), ("rtt_p99_us", "added RTT p99 (us)")):
        base = _med(summary, "plaintext", key)
        b, p = best(key, False)
        need = None if base is None or b is None else b - base

        def added(n: str, k: str = key, base: float | None = base) -> float | None:
            t = _med(summary, n, k)
            return None if t is None or base is None else t - base

        add(f"{label} <= best TLS peer's", need, p, added, lambda v, need=need: None if need is None else v <= need)
    b, p = best("cpu_s_per_gb", False)
    add(
        "CPU-s per GB <= best TLS peer's",
        b,
        p,
        lambda n: _med(summary, n, "cpu_s_per_gb"),
        lambda v, b=b: None if b is None else v <= b,
    )
    for step, key in zip(steps, ("rss_per_tunnel_step1_kib", "rss_per_tunnel_step2_kib"), strict=False):
        add(
            f"RSS per idle tunnel at {step} <= 64 KiB",
            64.0,
            "-",
            lambda n, k=key: _med(summary, n, k),
            lambda v: v <= 64.0,
        )
    add("4-stream run uses > 1 core", 1.0, "-", lambda n: _med(summary, n, "cores_4_streams"), lambda v: v > 1.0)
    row: dict[str, Any] = {"target": "X25519MLKEM768 negotiated (and nothing else)", "needed": None}
    every: set[str] = set()
    for name, (vkey, mkey) in _KEYS:
        g = groups.get(name, {})
        seen = sorted(set(g.get("capture", []) or []) | set(g.get("log", []) or []))
        every.update(seen)
        row[vkey] = None
        row[mkey] = (seen == ["X25519MLKEM768"]) if name in mine and seen else None
    row["best_peer"] = ", ".join(sorted(every)) or "-"
    rows.append(row)
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100 or (v == int(v) and a >= 10):
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: values, ratios to stunnel, targets, groups, versions, machine, errors."""
    meta = result["meta"]
    setups: list[str] = result["setups"]
    summary = result["summary"]
    rat = result["ratios"]
    runs = meta["config"]["runs"]
    m = meta["machine"]
    lines = [
        "# Side by side: tapproof and the tunnels people use today",
        "",
        f"`{meta['command']}` - {meta['config']['mode']} mode, {runs} run(s)"
        + (" (medians, [min-max])" if runs > 1 else "")
        + f", loopback, {m['started']}, {meta['elapsed_s']:.0f} s.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"load average at start {' / '.join(f'{x:.2f}' for x in m['loadavg_start'])}" + ".",
        "",
    ]
    for n in meta.get("notes", []):
        lines += [f"**Note:** {n}.", ""]
    steps = meta["config"]["idle_steps"]
    titles = [t.replace("{1}", str(steps[0])).replace("{2}", str(steps[-1])) for _k, t, _u, _h in METRICS]
    head = (
        "| setup | "
        + " | ".join(f"{t} ({u})" if u else t for t, (_k, _t, u, _h) in zip(titles, METRICS, strict=True))
        + " |"
    )
    sep = "|---|" + "---:|" * len(METRICS)
    lines += ["## Measured", "", head, sep]
    for name in setups:
        cells = []
        for key, *_ in METRICS:
            s = summary.get(name, {}).get(key)
            if s is None:
                cells.append("-")
            elif runs > 1 and s["n"] > 1:
                cells.append(f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]")
            else:
                cells.append(_fmt(s["median"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Ratio to {BASE} in the same run",
        "",
        "Higher is better for throughput, conn/s, cores and tunnels held; lower for RTT, CPU and RSS.",
        "",
    ]
    lines += [head, sep]
    for name in setups:
        cells = [f"{rat[name][k]:.2f}x" if k in rat.get(name, {}) else "-" for k, *_ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("targets"):
        lines += ["", "## Issue 5 targets (medians; best TLS peer = better of stunnel and haproxy)", ""]
        lines += [
            "| target | needed | best peer | tapproof | met | tapproof --mux | met |",
            "|---|---:|---|---:|---|---:|---|",
        ]
        yes = {True: "yes", False: "**no**", None: "-"}
        for t in result["targets"]:
            lines.append(
                f"| {t['target']} | {_fmt(t['needed'])} | {t['best_peer']} | {_fmt(t['tapproof'])} | "
                f"{yes[t['met']]} | {_fmt(t.get('tapproof_mux'))} | {yes[t.get('mux_met')]} |"
            )
    lines += ["", "## Key exchange", "", "| setup | negotiated group | how determined |", "|---|---|---|"]
    for name in setups:
        g = result["groups"].get(name, {})
        lines.append(f"| {name} | {g.get('summary', '-')} | {g.get('how', '-')} |")
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in meta["versions"].items() if v]
    errs = [(name, e) for name in setups for e in result["errors"].get(name, [])]
    if errs:
        lines += ["", "## Failures and notes (as they happened)", ""]
        lines += [f"- {name}: {e}" for name, e in errs]
    lines += ["", "How to read this: [bench/README.md](../README.md).", ""]
    return "\n".join(lines)
