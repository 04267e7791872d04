"""A real server over mutual TLS answers ``304`` to an ``If-None-Match`` on what agents poll, on one keep-alive
connection, and ``200`` with a new tag once the content changed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from tapproof.agent.enroll import enroll
from tapproof.agent.state import AgentPaths, load_bundle, load_credentials
from tapproof.tls import context
from tapproof.tls.stream import TLSStream, connect
from tapproof.units import parse_hostport
from tests.integration import procs
from tests.integration.procs import ServerProc as Server
from tests.integration.procs import tapproof


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with procs.server(tmp_path_factory.mktemp("srv") / "data") as srv:
        yield srv


class Conn:
    """One keep-alive HTTP/1.1 connection with the agent's credentials."""

    def __init__(self, server: Server, paths: AgentPaths) -> None:
        ctx = context.client_context(load_credentials(paths), load_bundle(paths))
        self.stream: TLSStream = connect(parse_hostport(server.address), ctx, timeout=5)
        self.h = h11.Connection(h11.CLIENT)

    def call(self, method: str, target: str, tag: str = "", body: object = None) -> tuple[int, dict[str, str], bytes]:
        """One request: (status, headers with lower-case names, body bytes)."""
        if self.h.our_state is h11.DONE:
            self.h.start_next_cycle()
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", "x"), ("Content-Length", str(len(payload)))]
        if tag:
            headers.append(("If-None-Match", tag))
        deadline = time.monotonic() + 10
        out = self.h.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if payload:
            out += self.h.send(h11.Data(data=payload)) or b""
        self.stream.sendall(out + (self.h.send(h11.EndOfMessage()) or b""), deadline)
        status, got, data = 0, {}, b""
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA:
                self.h.receive_data(self.stream.recv(65536, deadline))
            elif isinstance(ev, h11.Response):
                status, got = ev.status_code, {k.decode().lower(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return status, got, data
            else:
                raise AssertionError(f"unexpected {ev!r}")


def revalidate(conn: Conn, path: str) -> str:
    """200 with a tag, then 304 with that tag and no body; return the tag."""
    status, headers, body = conn.call("GET", path)
    assert status == 200, body
    tag = headers["etag"]
    assert tag.startswith('"'), tag
    assert tag.endswith('"'), tag
    assert json.loads(body)
    status, headers, body = conn.call("GET", path, tag)
    assert (status, headers["etag"], body) == (304, tag, b"")
    return tag


def test_polled_routes_answer_304_until_they_change(server: Server, tmp_path: Path) -> None:
    paths = AgentPaths(tmp_path / "a")
    enroll(paths.root, server.token("etag-1"))
    conn = Conn(server, paths)
    try:
        bundle = revalidate(conn, "/v1/bundle")
        registry = revalidate(conn, "/v1/registry")
        revocations = revalidate(conn, "/v1/revocations")
        registration = {"advertise": "127.0.0.1:7444", "services": {"etag-svc": ""}}
        assert conn.call("PUT", "/v1/registration", body=registration)[0] == 200
        status, headers, body = conn.call("GET", "/v1/registry", registry)
        assert status == 200
        assert headers["etag"] != registry
        assert json.loads(body)["hosts"]["etag-1"]["advertise"] == "127.0.0.1:7444"
        registry = headers["etag"]
        assert conn.call("PUT", "/v1/registration", body=registration)[0] == 200  # the same again
        assert conn.call("GET", "/v1/registry", registry)[0] == 304
        assert conn.call("GET", "/v1/revocations", revocations)[0] == 304
        other = AgentPaths(tmp_path / "b")
        enroll(other.root, server.token("etag-2"))
        res = tapproof("server", "revoke", "--data-dir", str(server.data_dir), "--host", "etag-2")
        assert res.returncode == 0, res.stderr
        status, headers, body = conn.call("GET", "/v1/revocations", revocations)
        assert status == 200
        assert "etag-2" in json.loads(body)["hosts"]
        assert headers["etag"] != revocations
        status, _, body = conn.call("GET", "/v1/registry", registry)
        assert status == 200
        assert json.loads(body)["hosts"]["etag-2"]["revoked"] is True
        assert conn.call("GET", "/v1/bundle", bundle)[0] == 304  # roots and servers did not change
    finally:
        conn.stream.abort()
