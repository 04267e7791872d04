"""One self-contained HTML report: inline CSS and SVG, no script, no network.

Charts: bytes by grade (bars), a host-pair matrix coloured by the worst grade,
and encrypted share of bytes over time. Then the links, worst first.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any

from tapproof.audit.verdict import GRADES

__all__ = ["GRADE_COLOURS", "render_html"]

GRADE_COLOURS = {
    "A": "#1a9850",
    "B": "#91cf60",
    "C": "#d9ef8b",
    "D": "#fee08b",
    "?": "#bdbdbd",
    "F": "#d73027",
}
_CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#666;font-size:13px}.cards{display:flex;gap:16px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 16px;min-width:150px}
.card b{display:block;font-size:24px}table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #eee;padding:4px 8px;text-align:left}
.g{display:inline-block;width:22px;text-align:center;border-radius:3px;font-weight:bold}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px;border-radius:4px}
svg text{font-family:DejaVu Sans,Arial,sans-serif;font-size:11px}
"""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _badge(g: str) -> str:
    return f'<span class="g" style="background:{GRADE_COLOURS[g]}">{escape(g)}</span>'


def _bars(summary: dict[str, Any]) -> str:
    by = summary["by_grade"]
    top = max((by[g]["bytes"] for g in GRADES), default=0) or 1
    w, row = 520, 26
    parts = [f'<svg width="{w + 220}" height="{row * len(GRADES) + 10}" role="img" aria-label="bytes by grade">']
    for i, g in enumerate(reversed(GRADES)):
        y = 5 + i * row
        bw = max(int(w * by[g]["bytes"] / top), 1 if by[g]["bytes"] else 0)
        parts.append(f'<text x="0" y="{y + 16}">{escape(g)}</text>')
        parts.append(f'<rect x="20" y="{y}" width="{bw}" height="{row - 6}" fill="{GRADE_COLOURS[g]}"/>')
        parts.append(f'<text x="{26 + bw}" y="{y + 16}">{_human(by[g]["bytes"])} · {by[g]["flows"]} flows</text>')
    parts.append("</svg>")
    return "".join(parts)


def _matrix(links: list[dict[str, Any]], max_hosts: int = 30) -> str:
    rank = {g: i for i, g in enumerate(GRADES)}
    pair: dict[tuple[str, str], str] = {}
    for link in links:
        key = (link["src"], link["dst"])
        if key not in pair or rank[link["grade"]] < rank[pair[key]]:
            pair[key] = link["grade"]
    srcs = sorted({s for s, _ in pair})[:max_hosts]
    dsts = sorted({d for _, d in pair})[:max_hosts]
    if not pair:
        return "<p>No flows.</p>"
    cell, left, top = 22, 130, 110
    w, h = left + cell * len(dsts) + 160, top + cell * len(srcs) + 10
    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="host-pair matrix">']
    for j, d in enumerate(dsts):
        x = left + j * cell + 15
        parts.append(f'<text transform="translate({x},{top - 6}) rotate(-60)">{escape(d)}</text>')
    for i, s in enumerate(srcs):
        y = top + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(s)}</text>')
        for j, d in enumerate(dsts):
            g = pair.get((s, d))
            fill = GRADE_COLOURS[g] if g else "#f6f6f6"
            title = f"<title>{escape(s)} → {escape(d)}: {escape(g)}</title>" if g else ""
            parts.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{fill}">{title}</rect>'
            )
            if g:
                parts.append(f'<text x="{left + j * cell + 7}" y="{y + 15}">{escape(g)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _timeline(points: list[dict[str, Any]]) -> str:
    if not points:
        return "<p>No data.</p>"
    w, h, pad = 640, 160, 30
    n = len(points)
    peak = max(p["bytes"] for p in points) or 1
    step = (w - 2 * pad) / max(n - 1, 1)
    share = [(p["encrypted_bytes"] / p["bytes"]) if p["bytes"] else None for p in points]
    vol = " ".join(
        f"{pad + i * step:.1f},{h - pad - (h - 2 * pad) * p['bytes'] / peak:.1f}" for i, p in enumerate(points)
    )
    line = " ".join(
        f"{pad + i * step:.1f},{h - pad - (h - 2 * pad) * s:.1f}" for i, s in enumerate(share) if s is not None
    )
    t0 = dt.datetime.fromtimestamp(points[0]["t"], dt.UTC).strftime("%H:%M:%S")
    t1 = dt.datetime.fromtimestamp(points[-1]["t"], dt.UTC).strftime("%H:%M:%S")
    return (
        f'<svg width="{w}" height="{h}" role="img" aria-label="coverage over time">'
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fafafa" stroke="#ddd"/>'
        f'<polyline points="{vol}" fill="none" stroke="#9ecae1" stroke-width="1.5"/>'
        f'<polyline points="{line}" fill="none" stroke="{GRADE_COLOURS["A"]}" stroke-width="2.5"/>'
        f'<text x="{pad}" y="{h - 10}">{t0} UTC</text><text x="{w - pad}" y="{h - 10}" text-anchor="end">{t1}</text>'
        f'<text x="2" y="{pad + 4}">100%</text><text x="2" y="{h - pad}">0%</text>'
        f'<text x="{pad + 6}" y="{pad - 8}" fill="{GRADE_COLOURS["A"]}">encrypted share of bytes</text>'
        f'<text x="{pad + 200}" y="{pad - 8}" fill="#6baed6">volume (relative)</text></svg>'
    )


def _links_table(links: list[dict[str, Any]], limit: int = 200) -> str:
    rows = [
        "<tr><th>grade</th><th>client</th><th>server</th><th>port</th><th>protocols</th><th>flows</th><th>bytes</th></tr>"
    ]
    rows.extend(
        f"<tr><td>{_badge(link['grade'])}</td><td>{escape(link['src'])}</td><td>{escape(link['dst'])}</td>"
        f"<td>{link['dport']}</td><td>{escape(', '.join(link['protocols']))}</td>"
        f"<td>{link['flows']}</td><td>{_human(link['bytes'])}</td></tr>"
        for link in links[:limit]
    )
    more = f"<p class=meta>{len(links) - limit} more links in the JSON report.</p>" if len(links) > limit else ""
    return "<table>" + "".join(rows) + "</table>" + more


def render_html(report: dict[str, Any]) -> str:
    """Render the report dict from :func:`~tapproof.audit.report.build_report` as one HTML page."""
    s = report["summary"]
    cov = s["coverage"]
    warn = "".join(f'<p class="warn">{escape(w)}</p>' for w in s["warnings"])
    files = escape(", ".join(s["files"]))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>tapproof audit</title><style>{_CSS}</style></head><body>"
        f"<h1>tapproof audit</h1><div class=meta>{files} · {s['packets']} packets · {s['flows']} flows</div>"
        f"{warn}<div class=cards>"
        f"<div class=card>encrypted bytes<b>{_pct(cov['bytes'])}</b></div>"
        f"<div class=card>encrypted flows<b>{_pct(cov['flows'])}</b></div>"
        f"<div class=card>post-quantum bytes<b>{_pct(cov['pq_bytes'])}</b></div>"
        f"<div class=card>worst grade<b>{_badge(s['worst_grade'])}</b></div></div>"
        f"<h2>Bytes by grade</h2>{_bars(s)}"
        f"<h2>Host pairs (worst grade, client → server)</h2>{_matrix(report['links'])}"
        f"<h2>Coverage over time</h2>{_timeline(report['timeline'])}"
        f"<h2>Links, worst first</h2>{_links_table(report['links'])}"
        "<p class=meta>A = TLS 1.3 + post-quantum hybrid group · B = TLS 1.3 classical · C = TLS 1.2 ECDHE+AEAD · "
        "D = other TLS or SSH · F = plaintext or broken · ? = not enough seen</p>"
        "</body></html>"
    )
