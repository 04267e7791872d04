"""SPIFFE ID parsing is exact: nothing is normalised."""

from __future__ import annotations

import pytest

from tapproof import identity
from tapproof.errors import ConfigError
from tapproof.identity import InvalidSpiffeID, Kind


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("spiffe://example.org/host/web-1", Kind.HOST, "web-1"),
        ("spiffe://example.org/svc/redis", Kind.SERVICE, "redis"),
        ("spiffe://example.org/tapproof/server", Kind.SERVER, "server"),
        ("spiffe://example.org/tapproof/admin", Kind.ADMIN, "admin"),
        ("spiffe://a.b-c_d/x/y/z", Kind.OTHER, "z"),
    ],
)
def test_parse_valid(text: str, kind: Kind, name: str) -> None:
    sid = identity.parse(text)
    assert str(sid) == text
    assert sid.kind is kind
    assert sid.name == name


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://example.org/host/a/../b",
        "spiffe://example.org/host/./a",
        "spiffe://example.org/host/a%2Fb",
        "spiffe://Example.org/host/a",
        "spiffe://example.org/host/a/",
        "spiffe://example.org/",
        "spiffe://example.org//a",
        "spiffe:///host/a",
        "SPIFFE://example.org/host/a",
        "https://example.org/host/a",
        "spiffe://example.org/host/a?x=1",
        "spiffe://example.org/host/a#f",
        "spiffe://user@example.org/host/a",
        "spiffe://example.org:443/host/a",
        "spiffe://example.org/host/é",
        "spiffe://example.org/" + "a" * 2100,
        "",
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidSpiffeID):
        identity.parse(text)


def test_constructors_validate_names() -> None:
    assert str(identity.host_id("example.org", "db-1")) == "spiffe://example.org/host/db-1"
    assert str(identity.service_id("example.org", "redis")) == "spiffe://example.org/svc/redis"
    for bad in ("", "-x", "A", "a/b", "..", "a" * 64, "x y"):
        with pytest.raises(ConfigError):
            identity.host_id("example.org", bad)
    with pytest.raises(ConfigError):
        identity.host_id("Example.org", "a")
