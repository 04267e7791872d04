"""The demo's service (an HTTP endpoint whose answer holds a canary secret) and its client.

Run as separate processes so that, with ``--netns``, each can live in its own namespace::

    python -m tapproof.demo.canary serve --listen HOST:PORT --ready FILE   (canary in $TAPPROOF_DEMO_CANARY)
    python -m tapproof.demo.canary fetch --connect HOST:PORT --out FILE [--timeout S]

``serve`` writes its bound ``HOST:PORT`` to the ready file; ``fetch`` writes the
response body (or ``error: ...``) to the out file and exits 0 only on HTTP 200.
No output on stdout: the demo reads files.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tapproof.units import parse_hostport

__all__ = ["CANARY_ENV", "body_for", "main"]

CANARY_ENV = "TAPPROOF_DEMO_CANARY"


def body_for(canary: str) -> bytes:
    """What the service answers: a small 'customer record' carrying the canary."""
    return f'{{"customer": "ACME Corp", "api_key": "{canary}", "balance_eur": 1250000}}\n'.encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "kv-demo/1"
    protocol_version = "HTTP/1.1"
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        return


def serve(listen: str, ready: Path, canary: str) -> int:
    """Serve until SIGTERM (the demo stops it by PID)."""
    host, port = parse_hostport(listen, what="--listen", allow_zero=True)
    handler = type("Handler", (_Handler,), {"body": body_for(canary)})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    bound = httpd.server_address
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(f"{host}:{bound[1]}")
    tmp.replace(ready)
    httpd.serve_forever(poll_interval=0.2)
    return 0


def fetch(connect: str, out: Path, timeout: float) -> int:
    """GET /customer once; write the body (or the error) to ``out``."""
    host, port = parse_hostport(connect, what="--connect")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/customer/42", headers={"Authorization": "Bearer demo-client"})
        resp = conn.getresponse()
        data = resp.read()
        status = resp.status
    except (OSError, http.client.HTTPException) as exc:
        out.write_text(f"error: {exc!r}")
        return 1
    finally:
        conn.close()
    out.write_bytes(data)
    return 0 if status == 200 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tapproof.demo.canary``."""
    parser = argparse.ArgumentParser(prog="python -m tapproof.demo.canary")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--listen", required=True)
    sp.add_argument("--ready", required=True, type=Path)
    fp = sub.add_parser("fetch")
    fp.add_argument("--connect", required=True)
    fp.add_argument("--out", required=True, type=Path)
    fp.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        canary = os.environ.get(CANARY_ENV, "")
        if not canary:
            parser.error(f"${CANARY_ENV} is not set")
        return serve(args.listen, args.ready, canary)
    return fetch(args.connect, args.out, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
