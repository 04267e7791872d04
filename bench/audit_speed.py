"""Benchmark: ``tapproof audit pcap`` against ``tshark -q -z conv,tcp`` on a generated >= 1 GB capture.

The capture is synthetic but shaped like a real tap on a server link:
Ethernet frames of up to 1514 bytes, ~50 concurrent connections interleaved,
TCP handshakes, TLS 1.3 (X25519MLKEM768 and X25519), TLS 1.2 ECDHE and
plaintext HTTP flows, bulk data in 1448-byte segments with a pure ACK every
second segment, FIN teardown. Both tools read the same file once warm in the
page cache; wall time and peak RSS are measured per process.

    .venv/bin/python bench/audit_speed.py [--size-gb 1.0] [--keep DIR]

Writes ``bench/results/audit.json`` and ``bench/results/audit.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tapproof.audit import synth  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MSS = 1448
ETH = bytes.fromhex("020000000002020000000001") + b"\x08\x00"


def _headers(src: bytes, dst: bytes, sport: int, dport: int) -> tuple[bytes, bytes, struct.Struct]:
    return src + dst, struct.pack("!HH", sport, dport), struct.Struct("!BBHHHBBH8s4sIIBBHHH")


def _packet(addrs: bytes, ports: bytes, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0) + addrs
    tcp = ports + struct.pack("!IIBBHHH", seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags, 65535, 0, 0)
    return ETH + ip + tcp + payload


def _flow_script(kind: str, size: int, pool: bytes, rng: random.Random) -> list[tuple[bool, bytes]]:
    """The payloads of one connection, in order: (client_to_server, bytes)."""
    if kind == "http":
        body = b"lorem ipsum dolor sit amet, consectetur adipiscing elit\n" * (size // 57 + 1)
        return [
            (True, b"GET /export.csv HTTP/1.1\r\nHost: files\r\n\r\n"),
            (False, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:size]),
        ]
    if kind == "tls12":
        sh = synth.server_hello(version=0x0303, cipher=0xC02F) + synth.server_key_exchange() + synth.server_hello_done()
        ch = synth.client_hello(versions=())
    else:
        sh = synth.server_hello(group=0x11EC if kind == "pq" else 0x001D)
        ch = synth.client_hello()
    off = rng.randrange(0, len(pool) - size - 1)
    return [(True, ch), (False, sh), (True, synth.app_data(200, rng)), (False, pool[off : off + size])]


def _records_pool(n: int, rng: random.Random) -> bytes:
    rec = bytearray()
    while len(rec) < n:
        rec += synth.app_data(16384, rng)
    return bytes(rec)


def generate(path: Path, size_bytes: int, seed: int = 7) -> dict[str, int]:
    """Write the benchmark capture; return counts."""
    rng = random.Random(seed)
    pool = _records_pool(48 << 20, rng)
    kinds = ["pq"] * 6 + ["classical"] * 2 + ["tls12"] + ["http"]
    written = packets = flows = 0
    t = 1_700_000_000.0
    with path.open("wb", buffering=1 << 22) as f:
        w = synth.PcapWriter(f, linktype=1)
        active: list[list[object]] = []
        while written < size_bytes or active:
            while len(active) < 50 and written < size_bytes:
                flows += 1
                kind = kinds[flows % len(kinds)]
                size = rng.randrange(256 << 10, 8 << 20)
                c = bytes([10, 1, flows >> 8 & 255, flows & 255])
                s = bytes([10, 2, 0, flows % 16])
                cport, sport = 30000 + flows % 30000, {"http": 80}.get(kind, 443)
                script = _flow_script(kind, size, pool, rng)
                segs: list[tuple[bool, bytes]] = []
                for c2s, data in script:
                    segs += [(c2s, data[i : i + MSS]) for i in range(0, len(data), MSS)]
                active.append(
                    [
                        c + s,
                        s + c,
                        struct.pack("!HH", cport, sport),
                        struct.pack("!HH", sport, cport),
                        segs,
                        0,
                        rng.randrange(1 << 32),
                        rng.randrange(1 << 32),
                        0,
                    ]
                )
                st = active[-1]
                a, b, pa, pb = st[0], st[1], st[2], st[3]
                for frame in (
                    _packet(a, pa, st[6] - 1, 0, 0x02, b""),  # type: ignore[operator, arg-type]
                    _packet(b, pb, st[7] - 1, st[6], 0x12, b""),  # type: ignore[operator, arg-type]
                    _packet(a, pa, st[6], st[7], 0x10, b""),  # type: ignore[arg-type]
                ):
                    t += 2e-6
                    w.write(t, frame)
                    written += 16 + len(frame)
                    packets += 1
            i = rng.randrange(len(active))
            st = active[i]
            a, b, pa, pb, segs, pos = st[0], st[1], st[2], st[3], st[4], st[5]
            burst = min(8, len(segs) - pos)  # type: ignore[arg-type, operator]
            for _ in range(burst):
                c2s, data = segs[pos]  # type: ignore[index]
                if c2s:
                    frame = _packet(a, pa, st[6], st[7], 0x18, data)  # type: ignore[arg-type]
                    st[6] += len(data)  # type: ignore[operator]
                else:
                    frame = _packet(b, pb, st[7], st[6], 0x18, data)  # type: ignore[arg-type]
                    st[7] += len(data)  # type: ignore[operator]
                t += 2e-6
                w.write(t, frame)
                written += 16 + len(frame)
                packets += 1
                pos += 1  # type: ignore[operator]
                st[8] += 1  # type: ignore[operator]
                if st[8] % 2 == 0:  # type: ignore[operator]
                    ackf = _packet(b, pb, st[7], st[6], 0x10, b"") if c2s else _packet(a, pa, st[6], st[7], 0x10, b"")  # type: ignore[arg-type]
                    w.write(t, ackf)
                    written += 16 + len(ackf)
                    packets += 1
            st[5] = pos
            if pos >= len(segs):  # type: ignore[operator, arg-type]
                for frame in (
                    _packet(a, pa, st[6], st[7], 0x11, b""),  # type: ignore[arg-type]
                    _packet(b, pb, st[7], st[6] + 1, 0x11, b""),  # type: ignore[operator, arg-type]
                    _packet(a, pa, st[6] + 1, st[7] + 1, 0x10, b""),  # type: ignore[operator, arg-type]
                ):
                    t += 2e-6
                    w.write(t, frame)
                    written += 16 + len(frame)
                    packets += 1
                active.pop(i)
    return {"bytes": path.stat().st_size, "packets": packets, "flows": flows}


# The CLI entry point when it lists "audit", else the same subcommand on a bare parser.
_RUNNER = """
import argparse, sys
from tapproof.cli import main as m
if "audit" in m._COMMANDS:
    sys.exit(m.main(sys.argv[1:]))
from tapproof.cli import audit
p = argparse.ArgumentParser(prog="tapproof")
audit.register(p.add_subparsers(dest="command", required=True))
a = p.parse_args(sys.argv[1:])
sys.exit(a.func(a))
"""


def _timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, str]:
    """Run argv; return (wall seconds, peak RSS in KB, exit code, stdout tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, int(usage.ru_maxrss), proc.returncode, out.decode("utf-8", "replace")[-600:]


def _row(tool: str, seconds: float, rss_kb: int, size: int) -> str:
    return f"| {tool} | {seconds:.2f} | {size / 1e6 / seconds:.0f} | {rss_kb / 1024:.0f} MB |"


def main(argv: list[str] | None = None) -> int:
    """Generate the capture, time both tools, write the results; return an exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument(
        "--size-gb", type=float, default=1.0, help="capture size in GB (default 1.0, at least 1 for the record)"
    )
    ap.add_argument("--keep", metavar="DIR", help="keep the capture in DIR instead of a temp dir")
    ap.add_argument("--runs", type=int, default=2, help="runs per tool; the best is kept (default 2)")
    ap.add_argument("--generate-only", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.generate_only:  # run in a child so the parent's memory does not inflate the measured RSS
        print(json.dumps(generate(Path(args.generate_only), int(args.size_gb * 1e9))))
        return 0
    tshark = shutil.which("tshark")
    tmp = args.keep or tempfile.mkdtemp(prefix="tapproof-bench-")
    try:
        cap = Path(tmp) / "audit-bench.pcap"
        t0 = time.perf_counter()
        gen = subprocess.run(
            [sys.executable, __file__, "--generate-only", str(cap), "--size-gb", str(args.size_gb)],
            check=True,
            capture_output=True,
            text=True,
        )
        info = json.loads(gen.stdout)
        gen_s = time.perf_counter() - t0
        print(
            f"generated {cap} ({info['bytes'] / 1e9:.2f} GB, {info['packets']} packets, "
            f"{info['flows']} flows) in {gen_s:.1f} s"
        )
        subprocess.run(["cat", str(cap)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        ours_argv = [
            sys.executable,
            "-c",
            _RUNNER,
            "audit",
            "pcap",
            str(cap),
            "--quiet",
            "--json",
            str(Path(tmp) / "report.json"),
        ]
        ours = min((_timed(ours_argv, env) for _ in range(args.runs)), key=lambda r: r[0])
        print(f"tapproof audit pcap: {ours[0]:.2f} s, peak RSS {ours[1] / 1024:.0f} MB, exit {ours[2]}")
        summary = json.loads((Path(tmp) / "report.json").read_text())["summary"]
        theirs = None
        if tshark:
            theirs = min(
                (_timed([tshark, "-q", "-z", "conv,tcp", "-r", str(cap)]) for _ in range(args.runs)), key=lambda r: r[0]
            )
            print(f"tshark -q -z conv,tcp: {theirs[0]:.2f} s, peak RSS {theirs[1] / 1024:.0f} MB, exit {theirs[2]}")
        result = {
            "capture": {**info, "generate_seconds": round(gen_s, 1)},
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "tapproof": {
                "seconds": round(ours[0], 2),
                "peak_rss_mb": round(ours[1] / 1024),
                "exit": ours[2],
                "mb_per_s": round(info["bytes"] / 1e6 / ours[0], 1),
                "flows": summary["flows"],
                "by_grade": {g: v["flows"] for g, v in summary["by_grade"].items()},
            },
            "tshark": None
            if theirs is None
            else {
                "seconds": round(theirs[0], 2),
                "peak_rss_mb": round(theirs[1] / 1024),
                "exit": theirs[2],
                "mb_per_s": round(info["bytes"] / 1e6 / theirs[0], 1),
            },
            "speedup_vs_tshark": None if theirs is None else round(theirs[0] / ours[0], 2),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
        md = [
            "# tapproof audit vs tshark",
            "",
            f"Capture: {info['bytes'] / 1e9:.2f} GB, {info['packets']} packets, {info['flows']} TCP flows "
            "(synthetic Ethernet, TLS 1.3 PQ/classical, TLS 1.2, plaintext HTTP), generated by `bench/audit_speed.py`.",
            f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"best of {args.runs} runs, warm page cache.",
            "",
            "| tool | seconds | MB/s | peak RSS |",
            "|---|---:|---:|---:|",
            _row("`tapproof audit pcap`", ours[0], ours[1], info["bytes"]),
        ]
        if theirs is not None:
            md.append(_row("`tshark -q -z conv,tcp -r`", theirs[0], theirs[1], info["bytes"]))
            md += ["", f"tapproof is {theirs[0] / ours[0]:.2f}x the speed of tshark on this file."]
        (RESULTS / "audit.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return 0 if ours[2] == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
