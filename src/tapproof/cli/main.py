"""``tapproof`` entry point: ``main(argv=None) -> int`` so the CLI is testable in-process.

Exit codes: 0 success; 1 a failure (or, for ``audit --fail-on``, the condition
met); 2 bad input (usage, config, join string, capture). Tracebacks only with
``--debug``; messages are one lower-case line naming the flag or key at fault.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tapproof import __version__, logs
from tapproof.errors import APIError, ConfigError, TapproofError

# Each module has ``register(subparsers)`` that adds its parser and sets ``func``.
_COMMANDS = ("server", "agent", "audit", "demo", "doctor")

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the whole argument parser."""
    parser = argparse.ArgumentParser(
        prog="tapproof",
        description="Encrypt every server-to-server link with post-quantum mutual TLS 1.3, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"tapproof {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log level (stderr, JSON lines; default: info for daemons, warning otherwise)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        module = importlib.import_module(f"tapproof.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    level = args.log_level or ("info" if getattr(args, "daemon", False) else "warning")
    logs.setup("debug" if args.debug else level)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("tapproof: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        if args.debug:
            logging.getLogger("tapproof").exception("config error")
        print(f"tapproof: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except APIError as exc:
        if args.debug:
            logging.getLogger("tapproof").exception("api error")
        print(f"tapproof: error: {exc}", file=sys.stderr)
        # the server validated the input (--ttl, --from, ...) and refused it: bad input, like a local ConfigError
        return EXIT_BAD_INPUT if exc.status == 400 else EXIT_FAIL
    except TapproofError as exc:
        if args.debug:
            logging.getLogger("tapproof").exception("error")
        print(f"tapproof: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
