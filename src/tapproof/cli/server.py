"""``tapproof server ...``: init, run, migrate, token, policy, revoke, status, audit-log."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tapproof.cli import serverca
from tapproof.clock import SystemClock
from tapproof.control import admin, runner
from tapproof.control import config as server_config
from tapproof.errors import ConfigError
from tapproof.identity import check_trust_domain
from tapproof.pki import cluster, keys
from tapproof.store import migrate, open_store
from tapproof.units import parse_duration


def register(sub: Any) -> None:
    """Add ``server`` and its subcommands."""
    p = sub.add_parser("server", help="the control plane: CA, enrollment, policy, revocation")
    ssub = p.add_subparsers(dest="server_command", metavar="SUBCOMMAND", required=True)

    def dd(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", required=True, type=Path, help="the server's data directory")

    sp = ssub.add_parser("init", help="create the CA (root + intermediate) and the configuration")
    dd(sp)
    sp.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. example.org")
    sp.add_argument("--db", help="database URL (default: SQLite in the data dir; or postgresql://...)")
    sp.add_argument("--listen", default=server_config.DEFAULT_LISTEN, help="API address (default %(default)s)")
    sp.add_argument("--advertise", action="append", default=[], help="address agents dial (repeatable)")
    sp.add_argument("--leaf-ttl", default="1h", help="lifetime of host certificates (default %(default)s)")
    sp.add_argument("--identity-algorithm", default="ecdsa-p256", choices=keys.ALGORITHMS, help="CA key algorithm")
    serverca.init_arguments(sp)
    sp.set_defaults(func=cmd_init)

    sp = ssub.add_parser("run", help="serve the API (mutual TLS 1.3, X25519MLKEM768)")
    dd(sp)
    sp.add_argument("--listen", help="HOST:PORT (default from server.toml, 127.0.0.1:7443)")
    sp.add_argument("--db", help="database URL (default from server.toml)")
    sp.add_argument("--advertise", action="append", help="address agents dial (repeatable)")
    sp.add_argument("--leaf-ttl", help="lifetime of host certificates")
    sp.add_argument("--metrics", help="Prometheus address (default 127.0.0.1:7446; '' disables)")
    sp.add_argument(
        "--renew-grace",
        help="how long after expiry a host's latest unrevoked certificate may still renew "
        "(default 24h; 0 disables; env TAPPROOF_RENEW_GRACE)",
    )
    sp.add_argument(
        "--unsafe-classical-groups",
        action="store_true",
        default=None,
        help="also accept classical key exchange (X25519, P-256, P-384) on the API port, for scanners without "
        "ML-KEM; logged at warning, shown in status and metrics; never use it in production",
    )
    sp.set_defaults(func=cmd_run, daemon=True)

    sp = ssub.add_parser("migrate", help="bring the database schema up to date")
    dd(sp)
    sp.add_argument("--db", help="database URL (default from server.toml)")
    sp.set_defaults(func=cmd_migrate)

    tp = ssub.add_parser("token", help="join tokens").add_subparsers(dest="token_command", required=True)
    sp = tp.add_parser("create", help="print ONE join string for a new host")
    dd(sp)
    sp.add_argument("--host", required=True, help="host name the token enrolls")
    sp.add_argument("--ttl", default="15m", help="token lifetime (default %(default)s)")
    sp.set_defaults(func=cmd_token_create)

    pp = ssub.add_parser("policy", help="who may reach which service").add_subparsers(
        dest="policy_command", required=True
    )
    for action in ("allow", "deny"):
        sp = pp.add_parser(action, help=f"add a rule that {action}s")
        dd(sp)
        sp.add_argument("--from", dest="source", required=True, help="identity pattern: host/web-*, *, spiffe://...")
        sp.add_argument("--to", dest="service", required=True, help="service name or pattern: redis, db-*, *")
        sp.add_argument("--ports", default="", help="ports: 6379 or 7000-7010,8080 (default: any)")
        sp.add_argument("--comment", default="")
        sp.set_defaults(func=cmd_policy_add, action=action)
    sp = pp.add_parser("list", help="list rules")
    dd(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_policy_list)
    sp = pp.add_parser("remove", help="remove a rule by id")
    dd(sp)
    sp.add_argument("rule_id", type=int)
    sp.set_defaults(func=cmd_policy_remove)
    sp = pp.add_parser("default", help="set the default when no rule is about a service")
    dd(sp)
    sp.add_argument("value", choices=["allow", "deny"])
    sp.set_defaults(func=cmd_policy_default)

    sp = ssub.add_parser("revoke", help="revoke a host (all its certificates) or one certificate")
    dd(sp)
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--host")
    g.add_argument("--serial", help="certificate serial, hex")
    sp.add_argument("--reason", default="")
    sp.set_defaults(func=cmd_revoke)

    sp = ssub.add_parser("status", help="CA expiry, hosts, services, certificates expiring soon")
    dd(sp)
    sp.add_argument("--soon", default="15m", help="what 'expiring soon' means (default %(default)s)")
    sp.add_argument("--expiry-warn", help="warning thresholds, e.g. 25%% or 25%%,root=365d (default from server.toml)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    serverca.register(ssub, dd)

    sp = ssub.add_parser("audit-log", help="print the append-only audit log")
    dd(sp)
    sp.add_argument("--since", type=int, default=0)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_audit_log)


def cmd_init(args: argparse.Namespace) -> int:
    """Create CA, config and database; on failure remove what was created."""
    clock = SystemClock()
    td = check_trust_domain(args.trust_domain)
    data_dir: Path = runner.check_data_dir(args.data_dir)
    if (data_dir / "server.toml").exists() or (data_dir / "ca").exists():
        raise ConfigError(f"--data-dir: {data_dir} already holds a tapproof server; refusing to overwrite it")
    created = not data_dir.exists()
    if args.join_cluster and not args.db:
        raise ConfigError("--join-cluster: give --db postgresql://... (the database of the cluster to join)")
    cfg = server_config.ServerConfig(
        data_dir=data_dir,
        trust_domain=td,
        db=args.db or server_config.default_db(data_dir),
        listen=args.listen,
        advertise=tuple(args.advertise),
        leaf_ttl=parse_duration(args.leaf_ttl, what="--leaf-ttl"),
        name=args.name,
        intermediate_ttl=parse_duration(args.intermediate_ttl, what="--intermediate-ttl"),
        expiry_warn=args.expiry_warn,
    )
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = open_store(cfg.db, migrate=True)
        try:
            if args.join_cluster:
                cfg.save()
                return serverca.join(cfg, store, args.identity_algorithm, clock.now())
            if store.list_trust_roots():
                raise ConfigError(
                    "--db: this database already belongs to a trust domain; use another database, "
                    "or --join-cluster to add this server to it"
                )
            ca = cluster.bootstrap(
                data_dir, store, td, cfg.name, clock.now(), args.identity_algorithm, cfg.intermediate_ttl
            )
            store.set_setting("trust_domain", td)
            store.append_audit(
                clock.now(), "local-cli", "init", {"trust_domain": td, "fingerprint": ca.root_fingerprint}
            )
        finally:
            store.close()
        cfg.save()
    except BaseException:
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for name in ("ca", "server.toml", "tapproof.db", "tapproof.db-wal", "tapproof.db-shm"):
                p = data_dir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    print(f"trust domain:     {td}")
    print(f"root fingerprint: {ca.root_fingerprint}")
    print(f"root expires:     {ca.root.not_valid_after_utc:%Y-%m-%d}")
    print(f"next: tapproof server run --data-dir {data_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM."""
    overrides = {
        "listen": args.listen,
        "db": args.db,
        "leaf_ttl": args.leaf_ttl,
        "metrics": args.metrics,
        "advertise": args.advertise,
        "unsafe_classical_groups": args.unsafe_classical_groups,
        "renew_grace": args.renew_grace,
    }
    return runner.run(args.data_dir, overrides, SystemClock())


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply schema migrations."""
    cfg = server_config.load(args.data_dir, {"db": args.db})
    before, after = migrate(cfg.db)
    print(f"schema version {before} -> {after}" if before != after else f"schema is up to date (version {after})")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    """Print ONE join string on stdout."""
    client = admin.admin_client(args.data_dir, SystemClock())
    resp = client.post("/v1/tokens", {"host": args.host, "ttl": args.ttl})
    sys.stdout.write(resp["join"] + "\n")
    return 0


def cmd_policy_add(args: argparse.Namespace) -> int:
    """Add an allow/deny rule."""
    client = admin.admin_client(args.data_dir, SystemClock())
    body = {
        "action": args.action,
        "source": args.source,
        "service": args.service,
        "ports": args.ports,
        "comment": args.comment,
    }
    resp = client.post("/v1/policy/rules", body)
    print(f"rule {resp['id']} added")
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    """List rules."""
    pol = admin.admin_client(args.data_dir, SystemClock()).get("/v1/policy")
    if args.json:
        print(json.dumps(pol, indent=2))
        return 0
    table = Table(title=f"policy (default: {pol['default']}, version {pol['version']})")
    for col in ("id", "action", "from", "to", "ports", "comment"):
        table.add_column(col)
    for r in pol["rules"]:
        table.add_row(str(r["id"]), r["action"], r["source"], r["service"], r["ports"] or "any", r["comment"])
    Console().print(table)
    return 0


def cmd_policy_remove(args: argparse.Namespace) -> int:
    """Remove a rule."""
    admin.admin_client(args.data_dir, SystemClock()).call("DELETE", f"/v1/policy/rules/{args.rule_id}")
    print(f"rule {args.rule_id} removed")
    return 0


def cmd_policy_default(args: argparse.Namespace) -> int:
    """Set default_policy."""
    admin.admin_client(args.data_dir, SystemClock()).call("PUT", "/v1/policy/default", {"default": args.value})
    print(f"default policy: {args.value}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a host or a serial."""
    client = admin.admin_client(args.data_dir, SystemClock())
    if args.host:
        resp = client.post("/v1/revoke", {"host": args.host, "reason": args.reason})
        print(f"revoked host {args.host} ({len(resp['revoked_serials'])} live certificates)")
    else:
        resp = client.post("/v1/revoke", {"serial": args.serial, "reason": args.reason})
        print(f"revoked certificate {args.serial} of {resp['revoked']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show status."""
    warn = f"&expiry_warn={urllib.parse.quote(args.expiry_warn)}" if args.expiry_warn else ""
    st = admin.admin_client(args.data_dir, SystemClock()).get(f"/v1/status?soon={args.soon}{warn}")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    t = Table(title=f"tapproof server — {st['trust_domain']}", show_header=False)
    t.add_row("root CA expires", st["root"]["not_after"])
    t.add_row("root fingerprint", st["root"]["fingerprint"])
    t.add_row("intermediate CA expires", st["intermediate"]["not_after"])
    t.add_row("hosts", f"{st['hosts']['total']} ({st['hosts']['revoked']} revoked)")
    t.add_row("services", str(st["services"]))
    t.add_row("default policy", str(st["default_policy"]))
    t.add_row("host certificate lifetime", f"{st['leaf_ttl_seconds']} s")
    t.add_row(f"expiring within {args.soon}", str(len(st["expiring_soon"])))
    Console().print(t)
    if st["expiring_soon"]:
        e = Table(title="certificates expiring soon")
        for col in ("serial", "identity", "not after"):
            e.add_column(col)
        for c in st["expiring_soon"]:
            e.add_row(c["serial"], c["spiffe_id"], c["not_after"])
        Console().print(e)
    serverca.print_expiries(st)
    return 0


def cmd_audit_log(args: argparse.Namespace) -> int:
    """Print the audit log."""
    resp = admin.admin_client(args.data_dir, SystemClock()).get(f"/v1/audit?since={args.since}")
    for e in resp["entries"]:
        if args.json:
            print(json.dumps(e))
        else:
            print(f"{e['id']:>6} {e['ts']} {e['actor']:<40} {e['action']:<18} {json.dumps(e['detail'])}")
    return 0
