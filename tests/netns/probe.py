"""Helper processes for the netns tests, run inside a namespace with ``python -m tests.netns.probe``.

``listen HOST PORT OUT``: accept ONE connection, write ``{"original_dst": [host, port], "peer": ...}``
to OUT, answer ``hello from HOST:PORT``, exit. Writes ``OUT.ready`` once listening.
``connect HOST PORT OUT [--mark M]``: connect, read the answer into OUT (``error: ...`` on failure).
``redirect ACTION JSON``: install/remove/repair transparent rules in this namespace.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from tapproof.agent.transparent import Redirector, TransparentError, mark_socket, original_dst


def listen(host: str, port: int, out: Path) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(8)
        srv.settimeout(20)
        Path(f"{out}.ready").write_text("ok")
        conn, peer = srv.accept()
        with conn:
            try:
                odst: list[object] | None = list(original_dst(conn))
            except TransparentError:
                odst = None
            out.write_text(json.dumps({"original_dst": odst, "peer": list(peer[:2])}))
            conn.sendall(f"hello from {host}:{port}".encode())
    return 0


def connect(host: str, port: int, out: Path, mark: int | None) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if mark is not None:
                mark_socket(s, mark)
            s.settimeout(10)
            s.connect((host, port))
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        out.write_text(data.decode())
    except OSError as exc:
        out.write_text(f"error: {exc}")
    return 0


def redirect(action: str, kwargs_json: str) -> int:
    """``redirect install|remove|crash JSON`` / ``redirect repair {}``: drive a Redirector in this namespace."""
    if action == "repair":
        return 0 if Redirector.repair() else 3
    r = Redirector(**json.loads(kwargs_json))
    if action in ("install", "crash"):  # crash: install and exit without removing, like a killed agent
        r.install()
    else:
        r.remove()
    return 0


def main(argv: list[str]) -> int:
    if argv[0] == "redirect":
        return redirect(argv[1], argv[2])
    cmd, host, port, out = argv[0], argv[1], int(argv[2]), Path(argv[3])
    if cmd == "listen":
        return listen(host, port, out)
    mark = int(argv[5], 0) if len(argv) > 5 and argv[4] == "--mark" else None
    return connect(host, port, out, mark)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
