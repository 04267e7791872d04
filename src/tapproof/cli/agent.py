"""``tapproof agent ...``: enroll (and, with the data plane, run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tapproof.agent import enroll as enrollment
from tapproof.pki import certs


def register(sub: Any) -> None:
    """Add ``agent`` and its subcommands."""
    p = sub.add_parser("agent", help="the per-host agent")
    asub = p.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    sp = asub.add_parser("enroll", help="enroll this host with a join string")
    sp.add_argument("--data-dir", required=True, type=Path, help="the agent's data directory")
    sp.add_argument("--join", required=True, help="join string from `tapproof server token create`")
    sp.set_defaults(func=cmd_enroll)


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enroll and print the identity obtained."""
    creds = enrollment.enroll(args.data_dir, args.join)
    print(f"identity:   {creds.spiffe_id}")
    print(f"serial:     {certs.serial_hex(creds.leaf)}")
    print(f"not after:  {creds.not_after:%Y-%m-%d %H:%M:%S} UTC")
    print(f"data dir:   {args.data_dir}")
    return 0
