"""Outside tools: Debian packages, versions, machine details, iperf3 and the TLS-group probe."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers import free_port

from bench.peers.runner import ROOT, BenchError, Procs, readline, wait_listening

# Debian package -> the executable it provides
PACKAGES = {"stunnel4": "stunnel4", "spiped": "spiped", "socat": "socat", "haproxy": "haproxy", "iperf3": "iperf3"}


def ensure_packages(install: bool, say: Any) -> list[str]:
    """Install the missing Debian packages with apt-get (as root); return those still missing."""
    missing = [pkg for pkg, exe in PACKAGES.items() if shutil.which(exe) is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"installing from Debian: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            try:
                subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                say(f"{argv[1]} timed out")
                break
        missing = [pkg for pkg, exe in PACKAGES.items() if shutil.which(exe) is None]
    return missing


def _first_line(argv: list[str], match: str = "") -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (res.stdout + "\n" + res.stderr).splitlines():
        if line.strip() and match.lower() in line.lower():
            return line.strip()
    return None


def versions() -> dict[str, str | None]:
    """Version strings of every tool in the comparison."""
    import cryptography
    import OpenSSL
    from cryptography.hazmat.backends.openssl import backend

    import tapproof

    return {
        "tapproof": f"{tapproof.__version__} (Python {platform.python_version()}, "
        f"cryptography {cryptography.__version__}, pyOpenSSL {OpenSSL.__version__}, {backend.openssl_version_text()})",
        "stunnel": _first_line(["stunnel4", "-version"], "stunnel "),
        "stunnel_openssl": _first_line(["stunnel4", "-version"], "compiled with"),
        "haproxy": _first_line(["haproxy", "-v"], "version"),
        "socat": _first_line(["socat", "-V"], "socat version"),
        "spiped": _first_line(["spiped", "-v"]),
        "iperf3": _first_line(["iperf3", "--version"], "iperf"),
        "system_openssl": _first_line(["openssl", "version"]),
        "tcpdump": _first_line(["tcpdump", "--version"], "tcpdump"),
    }


def machine() -> dict[str, Any]:
    """CPU model, cores, kernel, load average, time."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "loadavg_start": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def start_iperf_server(procs: Procs, log: Path) -> int:
    """An ``iperf3 -s`` on 127.0.0.1; its port."""
    port = free_port(hold=False)
    proc = procs.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], log)
    wait_listening(port, proc, "iperf3 -s")
    return port


def iperf(port: int, seconds: float, streams: int) -> dict[str, Any]:
    """One ``iperf3 -c`` run (client sends); bytes and bit/s as the receiver counted them."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    argv += ["--connect-timeout", "10000"]
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"iperf3 -P {streams} did not finish within {seconds + 60:.0f}s") from exc
    try:
        data = json.loads(res.stdout)
    except ValueError as exc:
        raise BenchError(f"iperf3 -P {streams}: no JSON ({res.stderr.strip()[:200]})") from exc
    if "error" in data:
        raise BenchError(f"iperf3 -P {streams}: {data['error']}")
    recv = data["end"]["sum_received"]
    return {"bytes": int(recv["bytes"]), "seconds": float(recv["seconds"]), "gbps": recv["bits_per_second"] / 1e9}


def probe_groups(ports: list[int], trigger: Any, work: Path) -> dict[str, Any]:
    """Capture the encrypted hop on lo while ``trigger()`` opens a few connections; grade it with tapproof audit.

    Returns ``{"groups": [...], "versions": [...], "flows": n}`` or ``{"error": why}``.
    """
    if shutil.which("tcpdump") is None:
        return {"error": "tcpdump not installed"}
    pcap = work / "probe.pcap"
    with contextlib.suppress(FileNotFoundError):
        pcap.unlink()
    flt = " or ".join(f"tcp port {p}" for p in ports)
    procs = Procs()
    try:
        proc = procs.spawn(
            ["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-n", "-s", "0", "-c", "3000", "-w", str(pcap), flt]
        )
        assert proc.stderr is not None
        line = readline(proc.stderr, 10)
        if b"listening" not in line:
            return {"error": f"tcpdump did not start: {line.decode(errors='replace').strip()}"}
        time.sleep(1.0)  # "listening" is printed a moment before packets are delivered
        trigger()
        time.sleep(0.5)
    finally:
        procs.stop_all()
    out = work / "probe.json"
    res = subprocess.run(
        [sys.executable, "-m", "tapproof", "audit", "pcap", str(pcap), "--json", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    if not out.exists():
        return {"error": f"tapproof audit pcap failed: {res.stderr.strip()[:200]}"}
    flows = [f for f in json.loads(out.read_text()).get("flows", []) if f.get("dport") in ports]
    return {
        "groups": sorted({f["group"] for f in flows if f.get("group")}),
        "versions": sorted({f["tls_version"] for f in flows if f.get("tls_version")}),
        "grades": sorted({f["grade"] for f in flows if f.get("grade")}),
        "flows": len(flows),
    }
