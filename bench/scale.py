"""Control-plane scale: N simulated agents enroll, then renew, against 1 and 2 servers on SQLite and PostgreSQL.

Each simulated host is a lightweight client, not a full agent: one ECDSA P-256 key,
a CSR, ``POST /v1/enroll`` over the pinned-root bootstrap (a real join secret, one
per host), then ``POST /v1/renew`` over mutual TLS 1.3 + X25519MLKEM768 with the
certificate it got, both through the real ``tapproof server`` processes. Host ``i``
goes to server ``i mod k`` first (the rest are its failover list), as agents with
different join strings would.

Per configuration (``sqlite-1``, ``sqlite-2``, ``postgres-1``, ``postgres-2``):

* issuances per second and client-side latency p50/p99, enrollment and renewal
  phases apart (all clients start each phase together), then a poll phase: ``--poll-hosts``
  hosts make one agent sync round each (GET policy, revocations, registry, bundle);
* per phase, the CPU seconds of each server process and of the PostgreSQL cluster
  (postmaster and backends), per operation; server RSS (VmRSS and peak VmHWM);
* database size: empty, after enrollment, after renewal; bytes per 1000 hosts and
  per renewal (each issuance adds a certificate row and an audit-log row).

The clients run on the same machine (``--workers`` processes, ``--concurrency``
threads each) and compete with the servers for CPU: issuances/s is what this
machine sustained with both; the server CPU seconds per issuance is the figure to
extrapolate from. PostgreSQL is a private throw-away instance (``tests/pgserver.py``,
fsync off). Bounded: ``--time-cap`` seconds per configuration (an unfinished run is
reported as such). Results merge into ``bench/results/scale.{json,md}`` by configuration.

Usage: ``python -m bench scale [--hosts 10000] [--configs sqlite-1,postgres-2] [--workers 3] [--concurrency 6]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tapproof.control import config as server_config
from tapproof.control.client import APIClient, enroll_pinned
from tapproof.control.joinstring import hash_secret, new_secret
from tapproof.errors import TapproofError
from tapproof.pki import certs, csr, keys
from tapproof.pki.ca import load_ca
from tapproof.store import TokenRecord, open_store
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("sqlite-1", "sqlite-2", "postgres-1", "postgres-2")
PHASES = ("enroll", "renew", "poll")
TD = "scale.tapproof.test"
console = Console(stderr=True)


# ---------------------------------------------------------------- the simulated hosts (worker processes)
def _order(servers: Sequence[str], i: int) -> list[str]:
    k = i % len(servers)
    return [*servers[k:], *servers[:k]]


def _pool(items: list[Any], concurrency: int, fn: Callable[[Any], None], deadline: float) -> None:
    """Run ``fn`` over ``items`` in ``concurrency`` threads, starting nothing after ``deadline``."""
    lock = threading.Lock()
    it = iter(items)

    def loop() -> None:
        while time.time() < deadline:
            with lock:
                item = next(it, None)
            if item is None:
                return
            fn(item)

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _worker(job: dict[str, Any], barrier: Any, progress: Any, out: Any) -> None:  # pragma: no cover - child
    """Enroll this worker's hosts, renew them, then one sync round each; all workers start each phase together."""
    servers, td, fp, deadline = job["servers"], job["td"], job["fingerprint"], job["deadline"]
    creds: dict[int, tuple[Credentials, TrustBundle]] = {}
    timings: dict[str, list[tuple[float, float, bool]]] = {p: [] for p in PHASES}
    lock = threading.Lock()

    def record(phase: str, start: float, ok: bool) -> None:
        with lock:
            timings[phase].append((start, time.time(), ok))
        progress.put((phase, 1, 0 if ok else 1))

    def client(i: int) -> APIClient:
        current, bundle = creds[i]
        return APIClient(_order(servers, i), td, lambda: context.client_context(current, bundle), timeout=60)

    def enroll(item: tuple[int, str]) -> None:
        i, secret = item
        start = time.time()
        try:
            key = keys.generate("ecdsa-p256")
            body = {"token": secret, "csr": csr.build(key, None).decode()}
            resp = enroll_pinned(_order(servers, i), td, fp, body, key, timeout=60)
            chain = tuple(certs.load_pem_chain(str(resp["certificate"]).encode(), what="certificate"))
            bundle = TrustBundle.from_pem(str(resp["bundle"]).encode())
            with lock:
                creds[i] = (Credentials(key, chain), bundle)
            record("enroll", start, True)
        except (TapproofError, OSError, KeyError):
            record("enroll", start, False)

    def renew(i: int) -> None:
        start = time.time()
        try:
            key = keys.generate("ecdsa-p256")
            resp = client(i).post("/v1/renew", {"csr": csr.build(key, creds[i][0].spiffe_id).decode()})
            certs.load_pem_chain(str(resp["certificate"]).encode(), what="certificate")
            record("renew", start, True)
        except (TapproofError, OSError, KeyError):
            record("renew", start, False)

    tags: dict[str, str] = {}  # path -> last ETag: what a running agent holds (same server state for all hosts)

    def poll(i: int) -> None:
        """What an agent's sync loop asks every round (policy, revocations, registry, bundle): one
        keep-alive connection, each call with the ETag of the last answer (304 when nothing changed)."""
        start = time.time()
        try:
            c = client(i)
            with c.session():
                for path in ("/v1/policy", "/v1/revocations", "/v1/registry", "/v1/bundle"):
                    tag = tags.get(path, "")
                    _status, rh, _body = c.call("GET", path, None, [("If-None-Match", tag)] if tag else [])
                    if rh.get("etag"):
                        tags[path] = rh["etag"]
            record("poll", start, True)
        except (TapproofError, OSError, KeyError):
            record("poll", start, False)

    def wait() -> None:
        barrier.wait(max(1.0, deadline - time.time() + 120))

    _pool(list(job["hosts"]), job["concurrency"], enroll, deadline)
    wait()
    _pool(sorted(creds), job["concurrency"], renew, deadline)
    wait()
    _pool(sorted(creds)[: job["poll_hosts"]], job["concurrency"], poll, deadline)
    out.put(timings)


# ---------------------------------------------------------------- measurements of the server side
def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS/VmHWM (MiB) and CPU seconds of one process."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        out["cpu_s"] = _cpu_seconds(pid, children=False)
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int, *, children: bool) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: waited-for children
    return ticks / os.sysconf("SC_CLK_TCK")


def _pg_cpu(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL cluster: postmaster, its exited children and the live backends."""
    total = _cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def _postmaster(pg: Any) -> int:
    """The postmaster's PID (first line of ``postmaster.pid`` in the data directory)."""
    return int((Path(pg.datadir) / "postmaster.pid").read_text().split()[0])


def _db_bytes(url: str) -> int:
    if url.startswith("sqlite:///"):  # pages in use as the current snapshot sees them (the WAL file never shrinks)
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"), timeout=60)) as conn:
            pages, free, size = (
                conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size")
            )
        return int((pages - free) * size)
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def _summary(samples: list[tuple[float, float, bool]]) -> dict[str, Any]:
    ok = [(s, e) for s, e, good in samples if good]
    if not ok:
        return {"ok": 0, "failed": len(samples)}
    lat = sorted((e - s) * 1000 for s, e in ok)
    wall = max(e for _, e in ok) - min(s for s, _ in ok)
    return {
        "ok": len(ok),
        "failed": len(samples) - len(ok),
        "seconds": round(wall, 2),
        "per_second": round(len(ok) / wall, 1) if wall > 0 else None,
        "p50_ms": round(statistics.median(lat), 1),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
    }


# ---------------------------------------------------------------- one configuration
def run_config(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Set up servers (and PostgreSQL), run the simulated hosts, measure; tear everything down."""
    from tests.integration import procs

    backend, nservers = name.split("-")
    pg = None
    if backend == "postgres":
        from tests.pgserver import start_postgres

        pg = start_postgres(tmp / "pg")
    servers: list[Any] = []
    try:
        url = pg.create_database("scale") if pg else None
        first = procs.start_server(tmp / "s1", td=TD, leaf_ttl="1h", db=url)
        servers.append(first)
        servers.extend(procs.start_peer_server(first, tmp / f"s{k}") for k in range(2, int(nservers) + 1))
        db = server_config.load(first.data_dir).db
        fingerprint = load_ca(first.data_dir, TD).root_fingerprint
        addresses = [s.address for s in servers]
        empty = _db_bytes(db)
        secrets = [new_secret() for _ in range(args.hosts)]
        now = dt.datetime.now(dt.UTC)
        with open_store(db) as store:  # tokens straight into the store: the benchmark is about issuance
            for i, secret in enumerate(secrets):
                store.add_token(TokenRecord(hash_secret(secret), f"h{i:06d}", now, now + dt.timedelta(hours=6)))
        with_tokens = _db_bytes(db)
        postmaster = _postmaster(pg) if pg else 0

        def sample() -> dict[str, float]:
            cpu = {f"server{k + 1}": _proc_status(s.proc.pid).get("cpu_s", 0.0) for k, s in enumerate(servers)}
            if postmaster:
                cpu["postgres"] = _pg_cpu(postmaster)
            return cpu

        result = _drive(args, addresses, fingerprint, secrets, sample, db)
        status = [_proc_status(s.proc.pid) for s in servers]
        result.update(
            config=name,
            backend=backend,
            servers=int(nservers),
            hosts=args.hosts,
            server_rss_mib=[round(st.get("VmRSS", 0), 1) for st in status],
            server_peak_rss_mib=[round(st.get("VmHWM", 0), 1) for st in status],
        )
        result["db_bytes"].update(empty=empty, with_tokens=with_tokens)
        if result["enroll"].get("ok"):
            result["db_bytes_per_1000_hosts"] = round(
                result["enroll"]["db_bytes_added"] / result["enroll"]["ok"] * 1000
            )
        if result["renew"].get("ok"):
            result["db_bytes_per_renewal"] = round(result["renew"]["db_bytes_added"] / result["renew"]["ok"])
        return result
    finally:
        for s in servers:
            s.stop()
        if pg:
            pg.cleanup()


def _drive(
    args: argparse.Namespace,
    addresses: list[str],
    fingerprint: str,
    secrets: list[str],
    sample: Callable[[], dict[str, float]],
    db: str,
) -> dict[str, Any]:
    """Run the workers; at each phase end sample the database size and ``sample()`` (CPU counters)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(args.workers)
    progress_q = ctx.Queue()
    out_q = ctx.Queue()
    deadline = time.time() + args.time_cap
    n = len(secrets)
    poll_hosts = min(n, args.poll_hosts)
    totals = {"enroll": n, "renew": n, "poll": poll_hosts}
    jobs = [
        {
            "servers": addresses,
            "td": TD,
            "fingerprint": fingerprint,
            "deadline": deadline,
            "concurrency": args.concurrency,
            "hosts": [(i, secrets[i]) for i in range(w, n, args.workers)],
            "poll_hosts": poll_hosts // args.workers + (1 if w < poll_hosts % args.workers else 0),
        }
        for w in range(args.workers)
    ]
    workers = [ctx.Process(target=_worker, args=(job, barrier, progress_q, out_q)) for job in jobs]
    marks: dict[str, dict[str, Any]] = {"start": {"cpu": sample(), "db": _db_bytes(db)}}
    for w in workers:
        w.start()
    timings: list[dict[str, list[tuple[float, float, bool]]]] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        tasks = {p: bar.add_task(p, total=totals[p]) for p in PHASES}
        done = dict.fromkeys(PHASES, 0)
        while len(timings) < len(workers) and time.time() < deadline + 180:
            try:
                phase, k, _failed = progress_q.get(timeout=0.5)
                done[phase] += k
                bar.advance(tasks[phase], k)
                if done[phase] >= totals[phase] and phase not in marks:
                    marks[phase] = {"cpu": sample(), "db": _db_bytes(db)}
            except queue.Empty:
                pass
            while True:
                try:
                    timings.append(out_q.get_nowait())
                except queue.Empty:
                    break
    for w in workers:
        w.join(30)
        if w.is_alive():
            w.kill()
    merged: dict[str, list[tuple[float, float, bool]]] = {p: [] for p in PHASES}
    for t in timings:
        for phase in PHASES:
            merged[phase] += t[phase]
    result: dict[str, Any] = {
        "complete": all(len(merged[p]) == totals[p] for p in PHASES) and len(timings) == len(workers)
    }
    before = marks["start"]
    for phase in PHASES:  # per phase: client view, CPU spent by each counter, database growth
        after = marks.get(phase) or {"cpu": sample(), "db": _db_bytes(db)}
        summary = _summary(merged[phase])
        summary["cpu_s"] = {k: round(after["cpu"][k] - before["cpu"].get(k, 0.0), 2) for k in after["cpu"]}
        summary["db_bytes_added"] = after["db"] - before["db"]
        if summary.get("ok"):
            summary["cpu_ms_per_op"] = {k: round(v * 1000 / summary["ok"], 2) for k, v in summary["cpu_s"].items()}
        result[phase] = summary
        before = after
    result["db_bytes"] = {"start": marks["start"]["db"], "end": before["db"]}
    return result


# ---------------------------------------------------------------- report
def _cpu_ms(phase: dict[str, Any], who: str) -> str:
    per = phase.get("cpu_ms_per_op", {})
    vals = [v for k, v in per.items() if k.startswith(who)]
    return f"{sum(vals):.1f}" if vals else "-"


def _md(data: dict[str, Any]) -> str:
    c = data["conditions"]
    lines = [
        "# Control-plane scale (bench/scale.py)",
        "",
        f"Machine: {c['cpus']} CPUs, Python {c['python']}; clients on the same machine "
        f"({c['workers']} processes x {c['concurrency']} threads). Generated by `python -m bench scale`.",
        "A poll round is one agent sync round: GET policy, revocations, registry, bundle over one keep-alive TLS "
        "connection, with the ETags of the last answers (before 2026-11-22: 4 connections, no ETags).",
        "CPU ms are per operation (per issuance, per poll round), summed over the servers / the PostgreSQL cluster.",
        "",
        "| config | hosts | enroll/s | p50/p99 ms | renew/s | p50/p99 ms | poll rounds/s | p50/p99 ms "
        "| server CPU ms/renewal | PG CPU ms/renewal | server CPU ms/poll round | PG CPU ms/poll round "
        "| server RSS MiB (peak) | DB bytes/1000 hosts | DB bytes/renewal | load avg | complete |",
        "|" + "---|" * 17,
    ]
    for name in CONFIGS:
        r = data["runs"].get(name)
        if not r:
            continue
        e, w, q = r["enroll"], r["renew"], r["poll"]
        rss = ", ".join(f"{a} ({b})" for a, b in zip(r["server_rss_mib"], r["server_peak_rss_mib"], strict=True))
        lines.append(
            f"| {name} | {r['hosts']} | {e.get('per_second')} | {e.get('p50_ms')}/{e.get('p99_ms')} "
            f"| {w.get('per_second')} | {w.get('p50_ms')}/{w.get('p99_ms')} "
            f"| {q.get('per_second')} | {q.get('p50_ms')}/{q.get('p99_ms')} "
            f"| {_cpu_ms(w, 'server')} | {_cpu_ms(w, 'postgres')} | {_cpu_ms(q, 'server')} | {_cpu_ms(q, 'postgres')} "
            f"| {rss} | {r.get('db_bytes_per_1000_hosts')} | {r.get('db_bytes_per_renewal')} "
            f"| {r['loadavg_before']} -> {r['loadavg_after']} | {r['complete']} |"
        )
    lines += ["", "Failures (enroll/renew/poll) per run:", ""]
    for name, r in sorted(data["runs"].items()):
        fails = "/".join(str(r[p].get("failed")) for p in PHASES)
        lines.append(f"- {name}: {fails}, finished {r['finished']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the configurations; merge into bench/results/scale.{json,md}."""
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=1000, help="simulated hosts per configuration (default 1000)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--workers", type=int, default=3, help="client processes (default 3)")
    p.add_argument("--concurrency", type=int, default=6, help="threads per client process (default 6)")
    p.add_argument("--poll-hosts", type=int, default=1000, help="hosts that make one sync round (default 1000)")
    p.add_argument("--time-cap", type=float, default=1800, help="seconds per configuration (default 1800)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not 1 <= args.hosts <= 100_000 or args.workers < 1 or args.concurrency < 1:
        p.error(f"--configs: unknown {bad}" if bad else "--hosts 1..100000, --workers and --concurrency >= 1")
    if any(n.startswith("postgres") for n in names) and not (
        shutil.which("initdb") or Path("/usr/lib/postgresql").exists()
    ):
        p.error("--configs: postgres needs initdb/pg_ctl installed")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scale.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["conditions"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "workers": args.workers,
        "concurrency": args.concurrency,
    }
    for name in names:
        console.print(f"[bold]scale {name}[/]: {args.hosts} hosts")
        load_before = [round(x, 2) for x in os.getloadavg()]
        with tempfile.TemporaryDirectory(prefix=f"tapproof-scale-{name}-") as tmp:
            result = run_config(name, args, Path(tmp))
        result["loadavg_before"] = load_before[0]
        result["loadavg_after"] = round(os.getloadavg()[0], 2)
        result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        data["runs"][name] = result
        path.write_text(json.dumps(data, indent=2) + "\n")
        (args.out / "scale.md").write_text(_md(data))
        console.print(json.dumps({k: result[k] for k in (*PHASES, "complete")}))
    console.print(f"results: {path} and {args.out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
