"""The side-by-side benchmark harness (``python -m bench peers``) produces a well-formed table and JSON.

A smoke run with tiny counts against plaintext and tapproof only (real agents,
real iperf3, real load clients); it checks the shape of the results and that
every figure is a real measurement, never a speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("tput_1_gbps", "tput_4_gbps", "cps_c1", "cps_c8", "rtt_p50_us", "rtt_p99_us", "rtt_p999_us")


def test_quick_run_writes_table_and_json(tmp_path: Path) -> None:
    require_tool("iperf3")
    argv = [sys.executable, "-m", "bench", "peers", "--quick", "--no-install", "--setups", "plaintext,tapproof"]
    argv += ["--out", str(tmp_path), "--name", "smoke", "--conns", "30", "--rounds", "300", "--idle", "10,30"]
    argv += ["--iperf-seconds", "1", "--no-capture"]  # the capture probe needs root and costs ~5 s
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    md = (tmp_path / "smoke.md").read_text()
    assert str(tmp_path / "smoke.md") in res.stdout

    assert data["setups"] == ["plaintext", "tapproof"]
    assert data["errors"] == {"plaintext": [], "tapproof": []}, data["errors"]
    for name in ("plaintext", "tapproof"):
        for key in METRICS:
            s = data["summary"][name][key]
            assert s["n"] == 1
            assert s["min"] == s["median"] == s["max"] > 0, (name, key, s)
    tap = data["runs"][0]["tapproof"]
    assert tap["cps_c8_detail"]["done"] == 30
    assert tap["pingpong"]["rounds"] == 300
    assert tap["cpu_s_per_gb"] > 0  # the agents' own CPU time was read from /proc
    assert [r["open"] for r in tap["idle"]] == [10, 30]
    assert tap["idle_held_step2"] == 30
    assert tap["rss_step2_mib"] > 1
    assert "cpu_s_per_gb" not in data["runs"][0]["plaintext"]  # no tunnel processes
    # tapproof's own log says which group it negotiated; it must be the post-quantum hybrid
    assert data["groups"]["tapproof"]["log"] == ["X25519MLKEM768"]
    assert data["ratios"]["tapproof"] == {}  # no stunnel in this run: no ratio is made up
    assert {"cpu", "cores", "kernel", "loadavg_start"} <= set(data["meta"]["machine"])
    assert data["meta"]["versions"]["iperf3"].startswith("iperf 3")

    rows = [line for line in md.splitlines() if line.startswith("| tapproof |")]
    assert len(rows) == 3  # measured, ratio, key exchange
    header = next(line for line in md.splitlines() if line.startswith("| setup | iperf3 1 stream"))
    assert rows[0].count("|") == header.count("|")
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert all(c not in ("", "-") for c in cells[1:8]), rows[0]
    assert "X25519MLKEM768" in rows[2]
