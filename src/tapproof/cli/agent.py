"""``tapproof agent ...``: enroll, run."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from tapproof.agent import enroll as enrollment
from tapproof.agent.config import (
    DEFAULT_ADMIN,
    DEFAULT_INBOUND_PORT,
    DEFAULT_LISTEN_TUNNEL,
    DEFAULT_TRANSPARENT_PORT,
)
from tapproof.errors import ConfigError
from tapproof.pki import certs
from tapproof.units import parse_duration

_SKEW_HELP = (
    "refuse a certificate when this host's clock is further than this from the control plane's "
    "(measured at enrollment and each renewal; default 5m; 0 disables)"
)


JOIN_ENV = "TAPPROOF_JOIN"
_JOIN_FILE_HELP = (
    "read the join string from this file ('-' for stdin) instead of --join, so it never shows in `ps`; "
    f"without either, the {JOIN_ENV} variable is used"
)


def _add_join(sp: argparse.ArgumentParser, help_join: str) -> None:
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--join", help=help_join)
    g.add_argument("--join-file", metavar="PATH", help=_JOIN_FILE_HELP)


def join_given(args: argparse.Namespace) -> bool:
    """True if a join string was given in any of the three ways (without reading a file)."""
    return args.join is not None or args.join_file is not None or JOIN_ENV in os.environ


def join_string(args: argparse.Namespace) -> str:
    """The join string from ``--join``, ``--join-file`` (``-``: stdin) or ``$TAPPROOF_JOIN``.

    None given, or one given but empty, is a :class:`ConfigError`: never "no join string" by accident.
    """
    text: str
    if args.join is not None:
        where, text = "--join", str(args.join)
    elif args.join_file is not None:
        where = f"--join-file {args.join_file}"
        try:
            text = sys.stdin.read() if args.join_file == "-" else Path(args.join_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    elif JOIN_ENV in os.environ:
        where, text = JOIN_ENV, os.environ.pop(JOIN_ENV)  # not left for /proc/PID/environ or child processes
    else:
        raise ConfigError(f"give the join string: --join, --join-file PATH or ${JOIN_ENV}")
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: empty join string")
    if len(text.split()) != 1:
        raise ConfigError(f"{where}: expected one join string, found several words")
    return text


def register(sub: Any) -> None:
    """Add ``agent`` and its subcommands."""
    p = sub.add_parser("agent", help="the per-host agent")
    asub = p.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    sp = asub.add_parser("enroll", help="enroll this host with a join string")
    sp.add_argument("--data-dir", required=True, type=Path, help="the agent's data directory")
    _add_join(sp, "join string from `tapproof server token create` (visible in `ps`: see --join-file)")
    sp.add_argument("--max-clock-skew", default="5m", help=_SKEW_HELP)
    sp.set_defaults(func=cmd_enroll)

    sp = asub.add_parser(
        "run",
        help="run the agent: tunnel port, routes, sync with the control plane",
        description="Settings come from the --config TOML file, then TAPPROOF_<KEY> variables, then flags "
        "(each later source wins). Every flag is also a TOML key (dashes become underscores); a repeatable "
        "flag given on the command line replaces the file's list.",
    )
    sp.add_argument("--data-dir", required=True, type=Path, help="the agent's data directory")
    _add_join(sp, "join string: enrolls on the first start (ignored once enrolled; visible in `ps`: see --join-file)")
    sp.add_argument("--config", type=Path, help="TOML file with the settings below (re-read on SIGHUP)")
    sp.add_argument("--listen-tunnel", help=f"HOST:PORT of the tunnel port (default {DEFAULT_LISTEN_TUNNEL})")
    sp.add_argument("--advertise", help="HOST:PORT peers dial (default: the tunnel address, 127.0.0.1 for 0.0.0.0)")
    sp.add_argument(
        "--service", action="append", default=[], metavar="NAME=HOST:PORT", help="front a local service (repeatable)"
    )
    sp.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="LISTEN_HOST:PORT=NAME@HOST",
        help="local plaintext listener tunnelled to service NAME on HOST (repeatable)",
    )
    sp.add_argument("--mode", choices=["strict", "permissive"], help="inbound plaintext handling (default strict)")
    sp.add_argument("--transparent", action="store_true", default=None, help="redirect fleet traffic (root)")
    sp.add_argument(
        "--transparent-port", type=int, help=f"port of the transparent listener (default {DEFAULT_TRANSPARENT_PORT})"
    )
    sp.add_argument("--fleet-cidr", action="append", default=[], metavar="CIDR", help="fleet addresses (repeatable)")
    sp.add_argument(
        "--protected-port",
        action="append",
        default=[],
        type=int,
        metavar="PORT",
        help="with --transparent: also protect this local port (repeatable; --service ports always are); "
        "inbound plaintext to it is refused (--mode strict) or forwarded and counted (permissive)",
    )
    sp.add_argument(
        "--inbound-port",
        type=int,
        help=f"with --transparent: port of the plaintext inbound listener (default {DEFAULT_INBOUND_PORT}; 0 = any)",
    )
    sp.add_argument("--admin", help=f"admin/metrics HOST:PORT (default {DEFAULT_ADMIN}; '' disables)")
    sp.add_argument("--renew-fraction", type=float, help="renew at this fraction of the lifetime (default 0.5)")
    sp.add_argument("--sync-interval", help="control-plane poll interval (default 5s)")
    sp.add_argument("--drain-timeout", help="how long SIGTERM waits for live tunnels (default 10s)")
    sp.add_argument("--idle-timeout", help="close a tunnel idle this long (default 1h)")
    sp.add_argument("--max-clock-skew", help=_SKEW_HELP)
    sp.add_argument(
        "--expiry-warn",
        help="expiry warning thresholds for leaf, intermediate and roots, e.g. 25%% or 25%%,root=365d "
        "(default 25%%; as the server's --expiry-warn)",
    )
    sp.add_argument(
        "--unsafe-service-target",
        action="store_true",
        default=None,
        help="allow --service targets that are not loopback (plaintext crosses the network)",
    )
    sp.add_argument(
        "--unsafe-route-listen",
        action="store_true",
        default=None,
        help="allow --route listeners on non-loopback addresses (others could use this host's identity)",
    )
    sp.add_argument(
        "--unsafe-classical-groups",
        action="store_true",
        default=None,
        help="also accept classical key exchange (X25519, P-256, P-384) on the tunnel port, for scanners without "
        "ML-KEM; logged at warning, shown in /status and metrics; never use it on a production link",
    )
    sp.add_argument(
        "--mux",
        action="store_true",
        default=None,
        help="carry outbound tunnels as streams multiplexed over pooled connections to each peer agent "
        "(ALPN tapproof-mux/1; a peer that does not select it gets one connection per tunnel); env TAPPROOF_MUX",
    )
    sp.set_defaults(func=cmd_run, daemon=True)


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enroll and print the identity obtained."""
    skew = dt.timedelta(0) if args.max_clock_skew.strip() in ("0", "0s") else None
    skew = skew if skew is not None else parse_duration(args.max_clock_skew, what="--max-clock-skew")
    creds = enrollment.enroll(args.data_dir, join_string(args), max_clock_skew=skew)
    print(f"identity:   {creds.spiffe_id}")
    print(f"serial:     {certs.serial_hex(creds.leaf)}")
    print(f"not after:  {creds.not_after:%Y-%m-%d %H:%M:%S} UTC")
    print(f"data dir:   {args.data_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM."""
    from tapproof.agent import daemon

    overrides = {
        "listen_tunnel": args.listen_tunnel,
        "advertise": args.advertise,
        "service": args.service,
        "route": args.route,
        "mode": args.mode,
        "transparent": args.transparent,
        "transparent_port": args.transparent_port,
        "fleet_cidr": args.fleet_cidr,
        "protected_port": args.protected_port,
        "inbound_port": args.inbound_port,
        "admin": args.admin,
        "renew_fraction": args.renew_fraction,
        "sync_interval": args.sync_interval,
        "drain_timeout": args.drain_timeout,
        "idle_timeout": args.idle_timeout,
        "max_clock_skew": args.max_clock_skew,
        "unsafe_service_target": args.unsafe_service_target,
        "unsafe_route_listen": args.unsafe_route_listen,
        "unsafe_classical_groups": args.unsafe_classical_groups,
        "mux": args.mux,
        "expiry_warn": args.expiry_warn,
    }
    join = (lambda: join_string(args)) if join_given(args) else None
    return daemon.run(args.data_dir, join, args.config, overrides)
