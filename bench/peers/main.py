"""``python -m bench peers [--quick] [--runs N] [--setups a,b] [--out DIR]``: every setup side by side.

See bench/README.md for what each figure means. The harness installs the
missing Debian packages (as root), makes the peers' certificates, then for
each run and each setup: starts the two ends, probes the negotiated TLS group,
measures ping-pong latency, new connections per second (c=1, c=8), iperf3
throughput (1 and 4 streams) with the tunnel processes' CPU time, and RSS with
idle tunnels; stops everything by PID; writes Markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bench.peers import certs as certmod
from bench.peers import procstat, report, tools
from bench.peers.load import raise_nofile
from bench.peers.runner import ROOT, BenchError, Procs, load_argv, readline, run_load, start_echo
from bench.peers.setups import ALL, Running, Setup

STEPS = ("group", "latency", "cps c=1", "cps c=8", "iperf3", "idle RSS")


def parse(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="repeat everything N times; medians and min-max (default 1)")
    p.add_argument("--quick", action="store_true", help="short smoke mode (small counts, 1 s iperf3)")
    p.add_argument("--setups", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    p.add_argument("--name", default="", help="results file stem (default peers, or peers-quick with --quick)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    p.add_argument("--iperf-seconds", type=float, help="seconds per iperf3 run (default 6; quick 1)")
    p.add_argument("--conns", type=int, help="connections per conn/s test (default 2000; quick 200)")
    p.add_argument("--rounds", type=int, help="ping-pong round trips (default 20000; quick 2000)")
    p.add_argument("--idle", help="idle-tunnel steps (default 1000,10000; quick 100,300)")
    p.add_argument("--max-minutes", type=float, default=120.0, help="stop measuring after this long (default 120)")
    p.add_argument("--no-capture", action="store_true", help="skip the tcpdump probe of the negotiated TLS group")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    a = p.parse_args(argv)
    quick = a.quick
    a.iperf_seconds = a.iperf_seconds or (1.0 if quick else 6.0)
    a.conns = a.conns or (200 if quick else 2000)
    a.rounds = a.rounds or (2000 if quick else 20000)
    a.idle = [int(x) for x in (a.idle or ("100,300" if quick else "1000,10000")).split(",")]
    a.setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    bad = [s for s in a.setups if s not in ALL]
    if bad:
        p.error(f"--setups: unknown {', '.join(bad)}; choose from {', '.join(ALL)}")
    if not 1 <= a.runs <= 20:
        p.error("--runs: 1 to 20")
    a.name = a.name or ("peers-quick" if quick else "peers")
    return a


class Bench:
    """One invocation: runs x setups x steps, with progress."""

    def __init__(self, args: argparse.Namespace, work: Path, progress: Progress) -> None:
        self.a = args
        self.work = work
        self.progress = progress
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.errors: dict[str, list[str]] = {s: [] for s in args.setups}
        self.groups: dict[str, dict[str, Any]] = {}
        self.certs = certmod.make(work)
        self.task = progress.add_task("starting", total=args.runs * len(args.setups) * len(STEPS))

    def say(self, msg: str) -> None:
        """A line above the progress bar."""
        self.progress.console.print(msg)

    # ---------------------------------------------------------------- one setup
    def measure(self, setup: Setup, run: int) -> dict[str, Any]:
        """Start ``setup``, run every step (each failure recorded, the others still run), stop it."""
        out: dict[str, Any] = {}
        name = setup.name
        errs = self.errors[name]
        done_steps = 0

        def step(label: str, fn: Callable[[], None]) -> None:
            nonlocal done_steps
            self.progress.update(self.task, description=f"run {run + 1}/{self.a.runs} {name}: {label}")
            t0 = time.monotonic()
            try:
                if time.monotonic() > self.deadline:
                    raise BenchError("skipped: --max-minutes reached")
                fn()
            except (
                BenchError,
                OSError,
                ValueError,
                KeyError,
                RuntimeError,
                AssertionError,
                subprocess.SubprocessError,
            ) as exc:
                errs.append(f"run {run + 1}, {label}: {exc}")
                self.say(f"[yellow]{name}: {label}: {exc}")
            finally:
                done_steps += 1
                self.progress.advance(self.task)
                out.setdefault("step_seconds", {})[label] = round(time.monotonic() - t0, 2)

        t_start = time.monotonic()
        started = False
        try:
            echo_port = start_echo(setup.procs)
            iperf_port = tools.start_iperf_server(setup.procs, setup.work / "iperf3.log")
            rn = setup.start({"echo": echo_port, "iperf": iperf_port})
            started = True
            out["step_seconds"] = {"start": round(time.monotonic() - t_start, 2)}
            self._alive_check(rn)
            step("group", lambda: self._group(setup, rn, run))
            step("latency", lambda: self._latency(rn, out))
            step("cps c=1", lambda: self._cps(rn, out, 1))
            step("cps c=8", lambda: self._cps(rn, out, 8))
            step("iperf3", lambda: self._iperf(rn, out))
            step("idle RSS", lambda: self._idle(setup, rn, out))
            self._alive_check(rn)
        except Exception as exc:  # noqa: BLE001 - a tool under test failing is a result to record, not a crash
            where = "" if started else ", start"
            errs.append(f"run {run + 1}{where}: {exc}")
            self.say(f"[red]{name}: {'' if started else 'could not start: '}{exc}")
        finally:  # also on Ctrl-C: every process of this setup is stopped by PID
            self.progress.advance(self.task, len(STEPS) - done_steps)
            t_stop = time.monotonic()
            setup.stop()
            out.setdefault("step_seconds", {})["stop"] = round(time.monotonic() - t_stop, 2)
            if setup.tls:
                logs = setup.groups_from_logs()
                if logs:
                    self.groups.setdefault(name, {})["log"] = logs
        return out

    @staticmethod
    def _alive_check(rn: Running) -> None:
        dead = [p for p in rn.tunnel_pids if not procstat.alive(p)]
        if dead:
            raise BenchError(f"tunnel process(es) {dead} exited")

    def _group(self, setup: Setup, rn: Running, run: int) -> None:
        if not setup.tls or not rn.tls_ports or run > 0 or self.a.no_capture:
            return
        port = rn.front["echo"]
        res = tools.probe_groups(
            rn.tls_ports, lambda: run_load(["cps", "--port", str(port), "--count", "3"], 30), setup.work
        )
        if "error" in res:
            raise BenchError(f"group probe: {res['error']}")
        self.groups.setdefault(setup.name, {})["capture"] = res["groups"]
        self.groups[setup.name]["capture_detail"] = res

    def _latency(self, rn: Running, out: dict[str, Any]) -> None:
        r = run_load(
            ["pingpong", "--port", str(rn.front["echo"]), "--rounds", str(self.a.rounds), "--timeout", "120"], 180
        )
        out["pingpong"] = r
        if r.get("rounds"):
            out.update(rtt_p50_us=r["p50_us"], rtt_p99_us=r["p99_us"], rtt_p999_us=r["p999_us"])
        if r.get("timed_out"):
            raise BenchError(f"ping-pong hit its time cap after {r.get('rounds')} round trips")

    def _cps(self, rn: Running, out: dict[str, Any], conc: int) -> None:
        args = ["cps", "--port", str(rn.front["echo"]), "--count", str(self.a.conns), "--concurrency", str(conc)]
        r = run_load([*args, "--timeout", "120"], 180)
        out[f"cps_c{conc}_detail"] = r
        if r["done"]:
            out[f"cps_c{conc}"] = r["per_second"]
        if r["failed"] or r["timed_out"]:
            raise BenchError(
                f"c={conc}: {r['done']} done, {r['failed']} failed {r['errors']}, timed out: {r['timed_out']}"
            )

    def _iperf(self, rn: Running, out: dict[str, Any]) -> None:
        roots = rn.tunnel_pids
        total_cpu = total_bytes = 0.0
        for streams in (1, 4):
            c0, t0 = procstat.cpu_seconds(roots), time.monotonic()
            r = tools.iperf(rn.front["iperf"], self.a.iperf_seconds, streams)
            c1, t1 = procstat.cpu_seconds(roots), time.monotonic()
            r["tunnel_cpu_s"] = round(c1 - c0, 3)
            r["wall_s"] = round(t1 - t0, 3)
            out[f"iperf_{streams}"] = r
            out[f"tput_{streams}_gbps"] = round(r["gbps"], 3)
            total_cpu += c1 - c0
            total_bytes += r["bytes"]
            if streams == 4 and roots:
                out["cores_4_streams"] = round((c1 - c0) / (t1 - t0), 2)
        if roots and total_bytes:
            out["cpu_s_per_gb"] = round(total_cpu / (total_bytes / 1e9), 3)

    def _idle(self, setup: Setup, rn: Running, out: dict[str, Any]) -> None:
        if not setup.idle_rss:
            return
        roots = rn.tunnel_pids
        base = procstat.rss_kib(roots)
        out["rss_base_mib"] = round(base / 1024, 1)
        steps = ",".join(str(s) for s in self.a.idle)
        timeout = 30 + 0.03 * max(self.a.idle)  # room for ~40 handshakes/s
        procs = Procs()
        detail: list[dict[str, Any]] = []
        out["idle"] = detail
        try:
            argv = load_argv("idle", "--port", str(rn.front["echo"]), "--steps", steps, "--timeout", str(timeout))
            proc = procs.add(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            )
            assert proc.stdout is not None
            assert proc.stdin is not None
            for n in self.a.idle:
                line = readline(proc.stdout, timeout + 10)
                if not line:
                    raise BenchError(f"idle load gave no result for {n} tunnels")
                r = json.loads(line)
                rss = procstat.rss_kib(roots)
                r.update(rss_kib=rss, threads=procstat.threads(roots), alive=all(procstat.alive(p) for p in roots))
                detail.append(r)
                tag = "step1" if n == self.a.idle[0] else "step2"
                if r["open"]:
                    out[f"rss_per_tunnel_{tag}_kib"] = round((rss - base) / r["open"], 1)
                out[f"rss_{tag}_mib"] = round(rss / 1024, 1)
                out[f"idle_held_{tag}"] = r["open"]
                if r["open"] < n or not r["alive"]:
                    raise BenchError(
                        f"held {r['open']} of {n} idle tunnels ({r['failed']} failed: {r['errors']}; "
                        f"{r['dropped']} dropped after opening; "
                        f"tunnel processes alive: {r['alive']})"
                    )
                proc.stdin.write(b"next\n")
                proc.stdin.flush()
        finally:
            procs.stop_all()

    # ---------------------------------------------------------------- all
    def run(self) -> list[dict[str, dict[str, Any]]]:
        """Every run, every setup (in the same order each run)."""
        runs: list[dict[str, dict[str, Any]]] = []
        for run in range(self.a.runs):
            this: dict[str, dict[str, Any]] = {}
            for name in self.a.setups:
                setup = ALL[name](self.work / f"run{run + 1}", self.certs)
                missing = setup.missing()
                if missing:
                    self.errors[name].append(f"run {run + 1}: not measured, {', '.join(missing)} not installed")
                    self.progress.advance(self.task, len(STEPS))
                    continue
                t0 = time.monotonic()
                this[name] = self.measure(setup, run)
                self.say(f"run {run + 1}/{self.a.runs} {name}: {time.monotonic() - t0:.0f} s")
            runs.append(this)
        return runs


def _group_summary(name: str, setup_tls: bool, g: dict[str, Any]) -> dict[str, Any]:
    cap, log = g.get("capture"), g.get("log")
    if name == "plaintext":
        return {"summary": "none (no encryption)", "how": "-"}
    if not setup_tls:
        return {"summary": "not TLS: spiped's own protocol (pre-shared key, DH for forward secrecy)", "how": "-"}
    seen = sorted(set(cap or []) | set(log or []))
    how = []
    if cap is not None:
        how.append(f"capture of the encrypted hop graded by tapproof audit: {', '.join(cap) or 'no group seen'}")
    if log:
        how.append(f"agents' tunnel events: {', '.join(log)}")
    return {"summary": ", ".join(seen) or "not determined", "how": "; ".join(how) or "-", **g}


def _sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the side-by-side benchmark; write ``OUT/NAME.md`` and ``OUT/NAME.json``."""
    a = parse(sys.argv[1:] if argv is None else argv)
    console = Console()
    nofile = raise_nofile()  # inherited by every tunnel process and load client started from here
    notes = []
    fit = (nofile - 200) // 2  # a one-process tunnel end holds 2 fds per tunnel (app side + encrypted side)
    if max(a.idle) > fit:
        notes.append(
            f"RLIMIT_NOFILE here is {nofile} and cannot be raised (no CAP_SYS_RESOURCE), and a one-process tunnel "
            f"end needs 2 descriptors per tunnel: the idle step {max(a.idle)} was lowered to {fit}"
        )
        a.idle = [min(x, fit) for x in a.idle]
    missing = tools.ensure_packages(not a.no_install, console.print)
    if "iperf3" in missing:
        console.print("[red]iperf3 is missing (install it: apt-get install iperf3)")
        return 2
    old = signal.signal(signal.SIGTERM, _sigterm)
    work = Path(tempfile.mkdtemp(prefix="tapproof-bench-"))
    t0 = time.monotonic()
    meta: dict[str, Any] = {
        "command": "python -m bench peers " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": tools.machine(),
        "versions": tools.versions(),
        "config": {
            "mode": "quick" if a.quick else "full",
            "runs": a.runs,
            "iperf_seconds": a.iperf_seconds,
            "conns": a.conns,
            "rounds": a.rounds,
            "idle_steps": a.idle,
            "rlimit_nofile": nofile,
        },
        "notes": notes,
    }
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            bench = Bench(a, work, progress)
            runs = bench.run()
    except KeyboardInterrupt:
        console.print(f"[red]interrupted; every started process was stopped (temp dir {work})")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    meta["loadavg_end"] = list(os.getloadavg())
    summary = report.summarize(runs, a.setups)
    groups = {s: _group_summary(s, ALL[s].tls, bench.groups.get(s, {})) for s in a.setups}
    result: dict[str, Any] = {
        "meta": meta,
        "setups": a.setups,
        "summary": summary,
        "ratios": report.ratios(runs, a.setups),
        "groups": groups,
        "errors": bench.errors,
        "runs": runs,
    }
    result["targets"] = report.targets(summary, groups, a.idle)
    a.out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = a.out / f"{a.name}.md", a.out / f"{a.name}.json"
    md = report.markdown(result)
    md_path.write_text(md)
    json_path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    sys.stdout.write(md + "\n")
    # soft_wrap: a long path printed whole stays copyable (rich would fold it at the terminal width)
    console.print(f"results: {md_path} and {json_path} ({meta['elapsed_s']:.0f} s)", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
