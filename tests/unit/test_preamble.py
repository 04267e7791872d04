"""The CONNECT preamble: the two sans-I/O machines against each other, no sockets."""

from __future__ import annotations

import pytest

from tapproof.errors import LocalProtocolError, RemoteProtocolError
from tapproof.tunnel.preamble import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_LINE_BYTES,
    ClientPreamble,
    ConnectRequest,
    Kind,
    ServerPreamble,
    parse_target,
)


def _exchange(
    client: ClientPreamble, server: ServerPreamble, status: int, *, chunk: int = 0
) -> tuple[ConnectRequest, int]:
    data = client.request()
    req = None
    if chunk:
        for i in range(0, len(data), chunk):
            assert req is None
            req = server.feed(data[i : i + chunk])
    else:
        req = server.feed(data)
    assert req is not None
    resp = client.feed(server.respond(status))
    assert resp is not None
    return req, resp.status


@pytest.mark.parametrize("status", [200, 403, 502])
def test_round_trip_service(status: int) -> None:
    client = ClientPreamble("redis", source="10.0.0.7:51234", request_id="abc-1")
    server = ServerPreamble()
    req, got = _exchange(client, server, status)
    assert req.target.kind is Kind.SERVICE
    assert req.target.name == "redis"
    assert req.source == "10.0.0.7:51234"
    assert req.request_id == "abc-1"
    assert req.header("HOST") == "redis"
    assert got == status


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("10.1.2.3:6379", "10.1.2.3", 6379),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
        ("db.example.org:5432", "db.example.org", 5432),
    ],
)
def test_round_trip_address_byte_at_a_time(target: str, host: str, port: int) -> None:
    client = ClientPreamble(target)
    server = ServerPreamble()
    req, status = _exchange(client, server, 200, chunk=1)
    assert req.target.kind is Kind.ADDRESS
    assert (req.target.host, req.target.port) == (host, port)
    assert str(req.target) == target
    assert status == 200


def test_leftovers_both_ways() -> None:
    client = ClientPreamble("redis")
    server = ServerPreamble()
    assert server.feed(client.request() + b"PING\r\n") is not None
    assert server.leftover == b"PING\r\n"
    resp = client.feed(server.respond(200) + b"+PONG")
    assert resp is not None
    assert resp.ok
    assert client.leftover == b"+PONG"


def test_leftover_byte_at_a_time_stops_at_the_blank_line() -> None:
    server = ServerPreamble()
    data = ClientPreamble("redis").request() + b"\n\nbare LF is payload"
    events = []
    for i in range(len(data)):
        if events:
            break
        ev = server.feed(data[i : i + 1])
        if ev is not None:
            events.append(ev)
            rest = data[i + 1 :]
    assert events
    assert server.leftover == b""
    assert rest == b"\n\nbare LF is payload"


def test_feed_after_event_is_a_local_error() -> None:
    server = ServerPreamble()
    assert server.feed(ClientPreamble("redis").request()) is not None
    with pytest.raises(LocalProtocolError):
        server.feed(b"x")


def test_eof() -> None:
    server = ServerPreamble()
    server.feed(b"CONNECT redis HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError):
        server.feed_eof()
    client = ClientPreamble("redis")
    with pytest.raises(RemoteProtocolError):
        client.feed_eof()


def _bad(data: bytes) -> None:
    server = ServerPreamble()
    with pytest.raises(RemoteProtocolError):
        server.feed(data)
    # The same bytes one at a time fail too (possibly earlier).
    server = ServerPreamble()
    with pytest.raises(RemoteProtocolError):  # noqa: PT012 (the byte that fails is unknown)
        for i in range(len(data)):
            server.feed(data[i : i + 1])
    assert server.respond(400).startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: redis\r\n\r\n",
        b"CONNECT redis HTTP/1.0\r\nHost: redis\r\n\r\n",
        b"connect redis HTTP/1.1\r\nHost: redis\r\n\r\n",
        b"CONNECT  redis HTTP/1.1\r\nHost: redis\r\n\r\n",
        b"CONNECT redis HTTP/1.1\nHost: redis\n\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\n folded\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost : redis\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: other\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nHost: redis\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nContent-Length: 5\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nX: a\x00b\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nX: caf\xc3\xa9\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nTapproof-Source: redis\r\n\r\n",
        b"CONNECT redis HTTP/1.1\r\nHost: redis\r\nTapproof-Request-Id: a b\r\n\r\n",
        b"CONNECT Redis HTTP/1.1\r\nHost: Redis\r\n\r\n",
        b"CONNECT -redis HTTP/1.1\r\nHost: -redis\r\n\r\n",
        b"CONNECT 10.0.0.1:0 HTTP/1.1\r\nHost: 10.0.0.1:0\r\n\r\n",
        b"CONNECT 10.0.0.1:65536 HTTP/1.1\r\nHost: 10.0.0.1:65536\r\n\r\n",
        b"CONNECT 10.0.0.1:080 HTTP/1.1\r\nHost: 10.0.0.1:080\r\n\r\n",
        b"CONNECT 010.0.0.1:80 HTTP/1.1\r\nHost: 010.0.0.1:80\r\n\r\n",
        b"CONNECT 1.2.3:80 HTTP/1.1\r\nHost: 1.2.3:80\r\n\r\n",
        b"CONNECT 2001:db8::1:80 HTTP/1.1\r\nHost: 2001:db8::1:80\r\n\r\n",
        b"CONNECT [2001:db8::0001]:80 HTTP/1.1\r\nHost: [2001:db8::0001]:80\r\n\r\n",
        b"CONNECT [zz]:80 HTTP/1.1\r\nHost: [zz]:80\r\n\r\n",
        b"CONNECT a..b:80 HTTP/1.1\r\nHost: a..b:80\r\n\r\n",
        b"CONNECT user@h:80 HTTP/1.1\r\nHost: user@h:80\r\n\r\n",
        b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    ],
)
def test_malformed_requests_are_remote_errors(data: bytes) -> None:
    _bad(data)


def test_limits() -> None:
    line = b"CONNECT " + b"a" * (MAX_LINE_BYTES - len(b"CONNECT  HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == MAX_LINE_BYTES
    # At the limit the line is read (and refused for its target, which is too long for a name).
    server = ServerPreamble()
    with pytest.raises(RemoteProtocolError, match="target"):
        server.feed(line + b"\r\nHost: x\r\n\r\n")
    _bad(line + b"a\r\n\r\n")
    _bad(b"CONNECT " + b"a" * 5000)  # no line end at all
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS))
    ok = b"CONNECT redis HTTP/1.1\r\nHost: redis\r\n" + headers[: -len(b"X-31: v\r\n")] + b"\r\n"
    assert ServerPreamble().feed(ok) is not None
    _bad(b"CONNECT redis HTTP/1.1\r\nHost: redis\r\n" + headers + b"\r\n")
    big = b"X: " + b"v" * 1000 + b"\r\n"
    _bad(b"CONNECT redis HTTP/1.1\r\nHost: redis\r\n" + big * 9 + b"\r\n")
    assert len(big * 9) > MAX_HEAD_BYTES


def test_server_respond_rules() -> None:
    server = ServerPreamble()
    with pytest.raises(LocalProtocolError):
        server.respond(200)  # no request yet
    server.feed(ClientPreamble("redis").request())
    with pytest.raises(LocalProtocolError):
        server.respond(400)  # the request was fine
    with pytest.raises(LocalProtocolError):
        server.respond(204)
    assert server.respond(403) == b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n"
    with pytest.raises(LocalProtocolError):
        server.respond(200)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\n\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ],
)
def test_malformed_responses_are_remote_errors(data: bytes) -> None:
    client = ClientPreamble("redis")
    with pytest.raises(RemoteProtocolError):
        client.feed(data)


@pytest.mark.parametrize("bad", ["", "Redis", "a b", "redis\r\nX: y", "10.0.0.1:0", "[::1]", "::1:80", "h:80:80", "é"])
def test_client_refuses_bad_targets_locally(bad: str) -> None:
    with pytest.raises(LocalProtocolError):
        ClientPreamble(bad)


def test_client_refuses_bad_source_and_id() -> None:
    with pytest.raises(LocalProtocolError):
        ClientPreamble("redis", source="redis")
    with pytest.raises(LocalProtocolError):
        ClientPreamble("redis", request_id="a\r\nb")


def test_parse_target() -> None:
    t = parse_target("[::1]:7444")
    assert (t.kind, t.host, t.port) == (Kind.ADDRESS, "::1", 7444)
    assert parse_target("svc.v2_x").name == "svc.v2_x"
