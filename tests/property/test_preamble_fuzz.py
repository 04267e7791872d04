"""Property tests of the CONNECT preamble: garbage is an event or a RemoteProtocolError."""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tapproof.errors import RemoteProtocolError
from tapproof.tunnel.preamble import ClientPreamble, ConnectResponse, ServerPreamble

_HEADISH = st.sampled_from(
    [
        b"CONNECT ",
        b"redis",
        b" HTTP/1.1",
        b"\r\n",
        b"\n",
        b"\r",
        b"Host: ",
        b": ",
        b" ",
        b"HTTP/1.1 200 OK",
        b"[::1]:80",
        b"\t",
        b"\x00",
        b"\xff",
        b"Tapproof-Source: 1.2.3.4:5",
    ]
)
_GARBAGE = st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(_HEADISH, st.binary(max_size=8)), max_size=60).map(b"".join),
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=400, deadline=None)
@given(_GARBAGE, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_server_garbage_is_event_or_remote_error(data: bytes, cuts: list[int]) -> None:
    server = ServerPreamble()
    try:
        for chunk in _chunks(data, cuts):
            if server.feed(chunk) is not None:
                return
        server.feed_eof()
    except RemoteProtocolError:
        return


@settings(max_examples=400, deadline=None)
@given(_GARBAGE, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_client_garbage_is_event_or_remote_error(data: bytes, cuts: list[int]) -> None:
    client = ClientPreamble("redis")
    try:
        for chunk in _chunks(data, cuts):
            ev = client.feed(chunk)
            if ev is not None:
                assert isinstance(ev, ConnectResponse)
                assert 200 <= ev.status <= 599
                return
        client.feed_eof()
    except RemoteProtocolError:
        return


_NAME = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z").filter(lambda s: s not in (".", ".."))
_LABEL = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9]\Z")
_PORT = st.integers(min_value=1, max_value=65535)
_V4 = st.ip_addresses(v=4).map(str)
_V6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
_DNS = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_ADDR = st.tuples(st.one_of(_V4, _V6, _DNS), _PORT).map(lambda hp: f"{hp[0]}:{hp[1]}")
_TARGET = st.one_of(_NAME, _ADDR)
_RID = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")


@settings(max_examples=300, deadline=None)
@given(
    _TARGET,
    st.one_of(st.none(), st.tuples(_V4, _PORT).map(lambda hp: f"{hp[0]}:{hp[1]}")),
    st.one_of(st.none(), _RID),
    st.binary(max_size=64),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
    st.sampled_from([200, 403, 502]),
)
def test_valid_requests_round_trip(
    target: str, source: str | None, rid: str | None, payload: bytes, cuts: list[int], status: int
) -> None:
    client = ClientPreamble(target, source=source, request_id=rid)
    server = ServerPreamble()
    data = client.request() + payload
    event = None
    fed = 0
    for chunk in _chunks(data, cuts):
        event = server.feed(chunk)
        fed += len(chunk)
        if event is not None:
            break
    assert event is not None
    assert str(event.target) == target
    if event.target.host and ":" in event.target.host:
        ipaddress.IPv6Address(event.target.host)
    assert event.source == source
    assert event.request_id == rid
    assert server.leftover + data[fed:] == payload
    resp = client.feed(server.respond(status) + payload)
    assert resp is not None
    assert resp.status == status
    assert client.leftover == payload
