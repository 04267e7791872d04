"""``tapproof server ca ...`` and ``server init --join-cluster``: per-server intermediates, root rotation.

These commands work on the shared store directly (no running server needed)
and on the root keys in the data dir they are given (or ``--root-key``), so
they run where the root key is. See docs/rotation.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tapproof.clock import SystemClock
from tapproof.control import config as server_config
from tapproof.errors import ConfigError, Conflict
from tapproof.identity import check_name
from tapproof.pki import certs, cluster, keys, rotation
from tapproof.store import Store, TrustRootRecord, open_store
from tapproof.units import format_duration

LIVE_WINDOW = dt.timedelta(minutes=5)


def _default_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    try:
        return check_name(name)
    except ConfigError:
        return "default"


def init_arguments(sp: argparse.ArgumentParser) -> None:
    """The CA flags of ``server init``."""
    sp.add_argument("--name", default=_default_name(), help="this server's name, unique in the database (%(default)s)")
    sp.add_argument("--intermediate-ttl", default="90d", help="lifetime of intermediates (default %(default)s)")
    sp.add_argument("--expiry-warn", default="25%", help="expiry warning thresholds (default %(default)s)")
    sp.add_argument(
        "--join-cluster",
        action="store_true",
        help="join the servers of --db: make this server's intermediate key and queue its request "
        "for `tapproof server ca sign-intermediate` (run where the root key is)",
    )


def register(ssub: Any, dd: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``server ca`` and its subcommands."""
    cp = ssub.add_parser("ca", help="intermediates and root rotation").add_subparsers(dest="ca_command", required=True)
    sp = cp.add_parser("sign-intermediate", help="sign the servers' queued intermediate requests (needs the root key)")
    dd(sp)
    sp.add_argument("--root-key", action="append", type=Path, default=[], help="a root key file kept offline")
    sp.set_defaults(func=cmd_sign)
    rp = cp.add_parser("rotate", help="root rotation: prepare, activate, retire").add_subparsers(
        dest="rotate_command", required=True
    )
    for step, text in (
        ("prepare", "make the next root and certify every server's intermediate under it; agents get both roots"),
        ("activate", "issue every new certificate under the next root (both roots stay trusted)"),
        ("retire", "drop the old root from the bundle"),
    ):
        sp = rp.add_parser(step, help=text)
        dd(sp)
        sp.add_argument("--root-key", action="append", type=Path, default=[], help="a root key file kept offline")
        if step != "prepare":
            sp.add_argument("--force", action="store_true", help="go on despite what blocks (may break connections)")
        sp.set_defaults(func=cmd_rotate, step=step)


def join(cfg: server_config.ServerConfig, store: Store, algorithm: keys.Algorithm, now: dt.datetime) -> int:
    """``server init --join-cluster``: a key and a queued request; no root here."""
    td = store.get_setting("trust_domain")
    if td is None or not store.list_trust_roots():
        raise ConfigError("--join-cluster: the database has no CA yet: run `tapproof server init` without it first")
    if td != cfg.trust_domain:
        raise ConfigError(f"--trust-domain: the cluster's trust domain is {td}, not {cfg.trust_domain}")
    if (
        any(i.server == cfg.name for i in store.list_intermediates())
        or any(s.name == cfg.name for s in store.list_ca_servers())
        or any(r.server == cfg.name for r in store.list_ca_requests())  # joined, not signed yet
    ):
        raise ConfigError(f"--name: a server called {cfg.name!r} already exists in this database; pick another")
    req = cluster.request(cfg.data_dir, store, cfg.name, now, algorithm)
    store.append_audit(now, "local-cli", "join-cluster", {"server": cfg.name, "key_id": req.key_id[:16]})
    print(f"server {cfg.name} joins trust domain {td}; its intermediate request is queued (key {req.key_id[:16]})")
    print("next, where the root key is:  tapproof server ca sign-intermediate --data-dir ROOT_DIR")
    print(f"then:                         tapproof server run --data-dir {cfg.data_dir}")
    return 0


def _store(args: argparse.Namespace) -> tuple[server_config.ServerConfig, Store]:
    cfg = server_config.load(args.data_dir)
    return cfg, open_store(cfg.db)


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign every queued request with the root keys at hand."""
    cfg, store = _store(args)
    try:
        now = SystemClock().now()
        root_keys = cluster.find_root_keys(cfg.data_dir, cluster.root_certs(store), args.root_key)
        if not root_keys:
            raise ConfigError("--root-key: no root key here: give the offline root key file with --root-key")
        pending = store.list_ca_requests()
        done = cluster.sign_requests(store, cfg.trust_domain, root_keys, now, cfg.intermediate_ttl)
        for rec in done:
            store.append_audit(now, "local-cli", "sign-intermediate", {"server": rec.server, "root": rec.root[:16]})
            print(
                f"signed an intermediate for {rec.server} under root {rec.root[:16]} (until {rec.not_after:%Y-%m-%d})"
            )
        if not pending:
            print("no pending requests")
    finally:
        store.close()
    return 0


def _snapshot(store: Store, now: dt.datetime, *, with_certs: bool = False) -> rotation.Snapshot:
    return rotation.Snapshot(
        now=now,
        roots=store.list_trust_roots(),
        intermediates=store.list_intermediates(),
        servers=store.list_ca_servers(),
        hosts=store.list_hosts(),
        certificates=store.unexpired_certificates(now) if with_certs else (),
        live_window=LIVE_WINDOW,
    )


def _refuse(step: rotation.Step, what: str, force: bool) -> None:
    if step.error:
        raise ConfigError(f"{what}: {step.error}")
    if step.blockers and not force:
        lines = "\n  ".join(step.blockers)
        raise ConfigError(f"{what}: refused, {len(step.blockers)} blocker(s):\n  {lines}\n(wait, or --force)")
    for b in step.blockers:
        print(f"warning (--force): {b}", file=sys.stderr)


def cmd_rotate(args: argparse.Namespace) -> int:
    """One rotation step."""
    cfg, store = _store(args)
    now = SystemClock().now()
    try:
        if args.step == "prepare":
            snap = _snapshot(store, now)
            _refuse(rotation.check_prepare(snap), "rotate prepare", False)
            root, key, path = cluster.new_root(cfg.data_dir, cfg.trust_domain, now)
            fp = certs.fingerprint(root)
            try:  # compare-and-set: two prepares at once leave one prepared root
                store.add_trust_root_if(
                    TrustRootRecord(fp, certs.to_pem(root).decode(), "prepared", now),
                    {r.fingerprint: r.state for r in snap.roots},
                )
            except Conflict as exc:
                path.unlink(missing_ok=True)
                raise ConfigError(
                    f"rotate prepare: another `rotate prepare` won the race ({exc}); nothing changed"
                ) from exc
            done = cluster.sign_keys_under(store, cfg.trust_domain, root, key, now, cfg.intermediate_ttl)
            root_keys = cluster.find_root_keys(cfg.data_dir, cluster.root_certs(store), args.root_key)
            cluster.sign_requests(store, cfg.trust_domain, root_keys, now, cfg.intermediate_ttl)
            store.append_audit(now, "local-cli", "rotate-prepare", {"root": fp, "intermediates": len(done)})
            print(f"prepared root {fp}")
            print(f"  key: {path} (keep it offline once the rotation is done)")
            print(f"  intermediates certified under it: {', '.join(sorted(r.server for r in done)) or 'none'}")
            print("  agents receive both roots within their sync interval; then: tapproof server ca rotate activate")
        elif args.step == "activate":
            step = rotation.check_activate(_snapshot(store, now))
            _refuse(step, "rotate activate", args.force)
            store.transition_trust_roots(step.expected, step.changes)
            new = next(fp for fp, st in step.changes.items() if st == "active")
            store.append_audit(now, "local-cli", "rotate-activate", {"root": new, "forced": bool(step.blockers)})
            print(f"activated root {new}: servers switch within seconds, agents renew under it at their next sync")
            print("join strings made from now on pin the new root; older ones no longer enroll")
            print("then, once every certificate moved: tapproof server ca rotate retire")
        else:
            step = rotation.check_retire(_snapshot(store, now, with_certs=True))
            _refuse(step, "rotate retire", args.force)
            store.transition_trust_roots(step.expected, step.changes)
            old = next(iter(step.changes))
            store.append_audit(now, "local-cli", "rotate-retire", {"root": old, "forced": bool(step.blockers)})
            print(f"retired root {old}: it leaves every bundle at the next sync")
    finally:
        store.close()
    return 0


def print_expiries(st: dict[str, Any]) -> None:
    """The expiry table of ``server status``."""
    items = st.get("expiries") or []
    if not items:
        return
    t = Table(title=f"expiries (warn at {st.get('expiry_warn', '')}; CA phase: {st.get('ca', {}).get('phase', '?')})")
    for col in ("kind", "name", "where", "not after", "time left", ""):
        t.add_column(col)
    for e in items:
        left = int(e["seconds_left"])
        where = e.get("server") or e.get("state") or ""
        text = format_duration(dt.timedelta(seconds=left)) if left > 0 else "EXPIRED"
        t.add_row(e["kind"], e["name"], where, e["not_after"], text, "WARN" if e["warn"] else "")
    Console().print(t)
    pending = st.get("ca", {}).get("pending_requests") or []
    if pending:
        print(f"intermediate requests waiting for the root key: {', '.join(pending)}")
