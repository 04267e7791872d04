"""The local admin endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/status`` (JSON).

Served by the standard library's :class:`http.server.ThreadingHTTPServer`
(no hand-written HTTP parsing); metrics rendered by ``prometheus_client``.
Binds 127.0.0.1 by default: ``/status`` tells who this host talks to.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from tapproof.errors import TransportError
from tapproof.units import format_hostport

log = logging.getLogger(__name__)

__all__ = ["AdminServer"]

Health = Callable[[], tuple[bool, str]]
Status = Callable[[], dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok, reason = self.server.health()
            self._json(200 if ok else 503, {"ok": ok, "reason": reason})
        elif path == "/status":
            self._json(200, self.server.status())
        else:
            self._json(404, {"error": f"no such path {path}; try /metrics, /healthz or /status"})

    def _json(self, status: int, body: Any) -> None:
        self._send(status, (json.dumps(body, default=str, indent=2) + "\n").encode(), "application/json")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin-request %s", format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], health: Health, status: Status) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.health = health
        self.status = status
        super().__init__(addr, _Handler)


class AdminServer:
    """Runs the admin HTTP server in a background thread."""

    def __init__(self, host: str, port: int, health: Health, status: Status) -> None:
        try:
            self._server = _Server((host, port), health, status)
        except OSError as exc:
            raise TransportError(f"--admin: cannot listen on {format_hostport(host, port)}: {exc.strerror}") from exc
        h, p = self._server.server_address[:2]
        self.address = format_hostport(str(h), int(p))
        """The bound address."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin-http", daemon=True)

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
