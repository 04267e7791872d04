"""The benchmark's issue-5 targets table: each target judged for each tapproof data path that ran."""

from __future__ import annotations

from typing import Any

from bench.peers import report


def _summary(**setups: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    return {name: {k: {"median": v, "min": v, "max": v, "n": 1} for k, v in m.items()} for name, m in setups.items()}


def _row(rows: list[dict[str, Any]], start: str) -> dict[str, Any]:
    (row,) = [r for r in rows if r["target"].startswith(start)]
    return row


def test_targets_for_both_paths_against_the_best_peer() -> None:
    summary = _summary(
        plaintext={"rtt_p50_us": 20.0},
        stunnel={"tput_1_gbps": 4.0, "cps_c8": 500.0, "rtt_p50_us": 100.0, "cpu_s_per_gb": 2.0},
        haproxy={"tput_1_gbps": 5.0, "cps_c8": 800.0, "rtt_p50_us": 120.0, "cpu_s_per_gb": 2.5},
        tapproof={"tput_1_gbps": 7.6, "cps_c8": 300.0, "rtt_p50_us": 90.0, "cpu_s_per_gb": 1.9},
        **{"tapproof-mux": {"tput_1_gbps": 4.0, "cps_c8": 2500.0, "rtt_p50_us": 150.0, "cpu_s_per_gb": 3.0}},
    )
    groups = {"tapproof": {"capture": ["X25519MLKEM768"]}, "tapproof-mux": {"log": ["X25519MLKEM768", "x25519"]}}
    rows = report.targets(summary, groups, [1000])
    tput = _row(rows, "throughput 1 stream")
    assert (tput["needed"], tput["best_peer"]) == (7.5, "haproxy")
    assert (tput["met"], tput["mux_met"]) == (True, False)
    cps = _row(rows, "conn/s c=8")
    assert (cps["needed"], cps["met"], cps["mux_met"]) == (2400.0, False, True)
    rtt = _row(rows, "added RTT p50")
    assert (rtt["needed"], rtt["tapproof"], rtt["met"], rtt["mux_met"]) == (80.0, 70.0, True, False)
    cpu = _row(rows, "CPU-s per GB")
    assert (cpu["needed"], cpu["met"], cpu["mux_met"]) == (2.0, True, False)
    pq = _row(rows, "X25519MLKEM768")
    assert (pq["met"], pq["mux_met"]) == (True, False)  # a classical group seen on the mux path is a miss


def test_only_the_mux_path_ran() -> None:
    summary = _summary(stunnel={"cps_c1": 400.0}, **{"tapproof-mux": {"cps_c1": 1300.0}})
    rows = report.targets(summary, {"tapproof-mux": {"log": ["X25519MLKEM768"]}}, [100, 300])
    cps = _row(rows, "conn/s c=1")
    assert (cps["tapproof"], cps["met"], cps["tapproof_mux"], cps["mux_met"]) == (None, None, 1300.0, True)
    pq = _row(rows, "X25519MLKEM768")
    assert (pq["met"], pq["mux_met"]) == (None, True)
    cores = _row(rows, "4-stream run")  # its verdict is not overwritten by the group row
    assert (cores["met"], cores["mux_met"]) == (None, None)
    assert report.targets(_summary(stunnel={"cps_c1": 1.0}), {}, [100]) == []
