"""Reports and the CLI: JSON fields, redaction, fail-on exit codes, HTML, bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tapproof.audit import synth
from tapproof.audit.errors import AuditInputError
from tapproof.audit.html import render_html
from tapproof.audit.pipeline import analyze
from tapproof.audit.report import build_report, redact
from tapproof.cli import audit as cli_audit

FIELDS = {
    "src", "sport", "dst", "dport", "protocol", "verdict", "grade", "tls_version", "cipher", "group",
    "group_code", "pq", "sni", "alpn", "bytes_c2s", "bytes_s2c", "packets", "first_seen", "last_seen", "sample",
}  # fmt: skip


def _mixed(path: Path) -> Path:
    with path.open("wb") as f:
        w = synth.PcapWriter(f)
        convs = [
            (
                ("10.0.0.1", 40001),
                ("10.0.0.9", 443),
                [("c", synth.client_hello(sni="a.example")), ("s", synth.server_hello())],
            ),
            (
                ("10.0.0.2", 40002),
                ("10.0.0.9", 443),
                [("c", synth.client_hello()), ("s", synth.server_hello(group=0x001D))],
            ),
            (
                ("10.0.0.3", 40003),
                ("10.0.0.9", 6379),
                [("c", b"*2\r\n$4\r\nAUTH\r\n$7\r\nhunter2\r\n"), ("s", b"+OK\r\n")],
            ),
        ]
        for i, (c, s, ex) in enumerate(convs):
            for ts, fr in synth.conversation(c, s, ex, t0=1_700_000_000.0 + i):
                w.write(ts, fr)
    return path


def test_json_fields_and_summary(tmp_path: Path) -> None:
    rep = build_report(analyze([str(_mixed(tmp_path / "m.pcap"))]))
    json.dumps(rep)
    assert [f["grade"] for f in rep["flows"]] == ["A", "B", "F"]
    for f in rep["flows"]:
        assert set(f) >= FIELDS
    a = rep["flows"][0]
    assert (a["group"], a["group_code"], a["pq"], a["sni"], a["tls_version"]) == (
        "X25519MLKEM768", "0x11EC", True, "a.example", "TLS 1.3",
    )  # fmt: skip
    redis = rep["flows"][2]
    assert redis["protocol"] == "redis"
    assert "hunter2" not in redis["sample"]
    assert "AUTH" in redis["sample"]
    s = rep["summary"]
    assert s["by_grade"]["A"]["flows"] == 1
    assert s["worst_grade"] == "F"
    assert 0 < s["coverage"]["bytes"] < 1
    assert s["coverage"]["flows"] == pytest.approx(2 / 3, abs=1e-5)
    assert rep["links"][0]["grade"] == "F"
    assert len(rep["timeline"]) == 60


def test_redact_keeps_keywords_only() -> None:
    out = redact(b"GET /admin?token=s3cret HTTP/1.1\r\n")
    assert out.startswith("GET /")
    assert "s3cret" not in out
    assert "token" not in out
    assert "HTTP/1.1\\r\\n" in out


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cli_audit.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_exit_codes_and_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cap = str(_mixed(tmp_path / "m.pcap"))
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert _run(["audit", "pcap", cap, "--json", str(out_json), "--html", str(out_html)]) == 0
    assert json.loads(out_json.read_text())["summary"]["flows"] == 3
    assert "<svg" in out_html.read_text()
    assert "links, worst first" in capsys.readouterr().out
    assert _run(["audit", "pcap", cap, "--fail-on", "plaintext", "--quiet"]) == 1
    assert _run(["audit", "pcap", cap, "--fail-on", "classical", "--quiet"]) == 1
    ok = tmp_path / "ok.pcap"
    with ok.open("wb") as f:
        w = synth.PcapWriter(f)
        for ts, fr in synth.conversation(
            ("10.0.0.1", 4), ("10.0.0.2", 443), [("c", synth.client_hello()), ("s", synth.server_hello())]
        ):
            w.write(ts, fr)
    assert _run(["audit", "pcap", str(ok), "--fail-on", "classical", "--quiet"]) == 0


def test_cli_bad_input_raises_config_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError):
        _run(["audit", "pcap", str(tmp_path / "missing.pcap")])
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(AuditInputError):
        _run(["audit", "pcap", str(junk)])


def test_cli_main_maps_bad_input_to_exit_2(tmp_path: Path) -> None:
    from tapproof.cli import main as cli_main

    assert cli_main.main(["audit", "pcap", str(tmp_path / "missing.pcap")]) == 2


def test_html_is_self_contained(tmp_path: Path) -> None:
    html = render_html(build_report(analyze([str(_mixed(tmp_path / "m.pcap"))])))
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    assert "<script" not in html
    assert html.count("<svg") == 3
