"""ETag/304 on what agents poll (``/v1/bundle``, ``/v1/registry``, ``/v1/revocations``), through the API router
with real stores (SQLite and PostgreSQL), a real CA and a fake clock; no sockets."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tapproof import identity
from tapproof.control import api, tlsctx
from tapproof.control.config import ServerConfig
from tapproof.control.joinstring import parse
from tapproof.control.service import REGISTRY_MAX_AGE, ControlPlane
from tapproof.pki import csr, keys
from tapproof.pki.ca import LocalCA, init_ca
from tapproof.store import SQLStore, open_store
from tapproof.store.engine import parse_url
from tapproof.testing import FakeClock

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
TD = "example.org"
PEER = identity.host_id(TD, "web-1")
STRONG_TAG = re.compile(r'^"[^"\s]+"$')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tapproof.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    """One CA for every control plane of a test."""
    return init_ca(tmp_path / "ca", TD, T0 - dt.timedelta(days=1))


@pytest.fixture
def planes(tmp_path: Path, db: str, ca: LocalCA) -> Iterator[Callable[[], ControlPlane]]:
    """Make control planes on one database, each with its own store handle (as separate servers have)."""
    stores: list[SQLStore] = []

    def make() -> ControlPlane:
        store = open_store(db, migrate=True)
        stores.append(store)
        cfg = ServerConfig(tmp_path, TD, db)
        return ControlPlane(store, ca, cfg, FakeClock(T0), [f"127.0.0.1:{7443 + len(stores)}"])

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def cp(planes: Callable[[], ControlPlane]) -> ControlPlane:
    """One control plane with host web-1 enrolled."""
    plane = planes()
    _enroll(plane, "web-1")
    return plane


def _enroll(plane: ControlPlane, host: str) -> str:
    js = parse(plane.create_token(host, dt.timedelta(minutes=15), "admin"))
    key = keys.generate()
    issued = plane.enroll(js.secret, csr.build(key, None).decode(), "test", tls_key=tlsctx.key_der(key.public_key()))
    return issued.serial


def get(plane: ControlPlane, path: str, tag: str = "", peer: identity.SpiffeID | None = PEER) -> api.Response:
    """GET ``path`` as an agent (or, with ``peer=None``, as a bootstrap client) would (a pre-encoded body decoded)."""
    resp = api.handle(plane, api.Request("GET", path, {}, b"", peer, "test", if_none_match=tag))
    if isinstance(resp.body, bytes):
        return dataclasses.replace(resp, body=json.loads(resp.body))
    return resp


def etag(resp: api.Response) -> str:
    """The response's ETag header ('' if none)."""
    return dict(resp.headers).get("ETag", "")


def assert_revalidates(plane: ControlPlane, path: str, peer: identity.SpiffeID | None = PEER) -> str:
    """200 with a strong tag; 304 with the same tag and no body to that tag; 200 to another tag. The tag."""
    first = get(plane, path, peer=peer)
    assert first.status == 200
    tag = etag(first)
    assert STRONG_TAG.match(tag), tag
    again = get(plane, path, tag, peer=peer)
    assert (again.status, again.body, etag(again)) == (304, None, tag)
    other = get(plane, path, '"stale"', peer=peer)
    assert (other.status, other.body, etag(other)) == (200, first.body, tag)
    return tag


def test_registry_revalidates_and_changes_with_a_registration(cp: ControlPlane) -> None:
    tag = assert_revalidates(cp, "/v1/registry")
    cp.register(PEER, "10.0.0.1:7444", {"redis": "cache"})
    after = get(cp, "/v1/registry", tag)
    assert after.status == 200
    assert after.body["services"] == [
        {"name": "redis", "host": "web-1", "advertise": "10.0.0.1:7444", "spiffe_id": f"spiffe://{TD}/svc/redis"}
    ]
    assert etag(after) != tag
    assert assert_revalidates(cp, "/v1/registry") == etag(after)


def test_registry_tag_stays_on_a_repeated_registration(cp: ControlPlane) -> None:
    cp.register(PEER, "10.0.0.1:7444", {"redis": "cache", "api": ""}, ["aa"])
    tag = assert_revalidates(cp, "/v1/registry")
    cp.clock.advance(60)  # type: ignore[attr-defined]
    cp.register(PEER, "10.0.0.1:7444", {"api": "", "redis": "other description"}, ["aa", "bb"])
    assert get(cp, "/v1/registry", tag).status == 304
    cp.register(PEER, "10.0.0.1:7445", {"api": "", "redis": ""})  # the tunnel address moved
    assert get(cp, "/v1/registry", tag).status == 200


def test_registry_tag_changes_on_enrollment_and_revocation(cp: ControlPlane) -> None:
    tag = assert_revalidates(cp, "/v1/registry")
    _enroll(cp, "web-2")
    second = assert_revalidates(cp, "/v1/registry")
    assert second != tag
    cp.revoke_host("web-2", "gone", "admin")
    resp = get(cp, "/v1/registry", second)
    assert resp.status == 200
    assert resp.body["hosts"]["web-2"]["revoked"] is True


def test_registry_rendered_once_per_version(cp: ControlPlane) -> None:
    tag, body = cp.registry_tagged()
    assert cp.registry_tagged()[1] is body  # cached: not re-rendered while the version stands
    cp.register(PEER, "10.0.0.1:7444", {})
    new_tag, new_body = cp.registry_tagged()
    assert new_body is not body
    assert new_tag != tag


def test_registry_change_through_another_server_is_seen_at_its_next_request(
    planes: Callable[[], ControlPlane], cp: ControlPlane
) -> None:
    other = planes()  # a second server: its own store handle and cache
    tag = assert_revalidates(other, "/v1/registry")
    assert etag(get(cp, "/v1/registry")) == tag  # one database, one version: both servers give one tag
    cp.register(PEER, "10.0.0.1:7444", {"redis": ""})
    resp = get(other, "/v1/registry", tag)
    assert resp.status == 200
    assert resp.body["hosts"]["web-1"]["advertise"] == "10.0.0.1:7444"
    assert etag(resp) == etag(get(cp, "/v1/registry"))


def test_revocations_revalidate_and_change_with_revocation_and_expiry(cp: ControlPlane) -> None:
    tag = assert_revalidates(cp, "/v1/revocations")
    serial = _enroll(cp, "web-2")
    assert get(cp, "/v1/revocations", tag).status == 304  # an enrollment revokes nothing
    cp.revoke_serial(serial, "lost", "admin")
    resp = get(cp, "/v1/revocations", tag)
    assert resp.status == 200
    assert resp.body == {"serials": [serial], "hosts": []}
    revoked = assert_revalidates(cp, "/v1/revocations")
    cp.revoke_host("web-1", "gone", "admin")
    resp = get(cp, "/v1/revocations", revoked)
    assert resp.status == 200
    assert resp.body["hosts"] == ["web-1"]
    both = etag(resp)
    cp.clock.advance(2 * 3600)  # type: ignore[attr-defined]  # the certificates (1 h) expire: serials drop out
    resp = get(cp, "/v1/revocations", both)
    assert resp.status == 200
    assert resp.body == {"serials": [], "hosts": ["web-1"]}


def test_bundle_revalidates_and_changes_with_the_servers(cp: ControlPlane) -> None:
    tag = assert_revalidates(cp, "/v1/bundle")
    assert set(get(cp, "/v1/bundle").body) == {"trust_domain", "bundle", "active", "servers"}
    bootstrap = assert_revalidates(cp, "/v1/bundle", peer=None)  # no servers list: another body, another tag
    assert bootstrap != tag
    cp.store.register_server("10.0.0.9:7443", cp.clock.now())
    resp = get(cp, "/v1/bundle", tag)
    assert resp.status == 200
    assert "10.0.0.9:7443" in resp.body["servers"]
    assert get(cp, "/v1/bundle", bootstrap, peer=None).status == 304  # what a bootstrap client sees is unchanged


def test_registry_write_that_did_not_bump_is_served_within_the_max_age(cp: ControlPlane) -> None:
    """A server older than schema v4 (rolling upgrade) changes rows without bumping the version."""
    cp.register(PEER, "10.0.0.1:7444", {})
    tag = assert_revalidates(cp, "/v1/registry")
    _raw_sql(cp, "UPDATE hosts SET advertise = '10.0.0.2:7444' WHERE name = 'web-1'")
    assert get(cp, "/v1/registry", tag).status == 304  # cached for the version
    cp.clock.advance(REGISTRY_MAX_AGE)  # type: ignore[attr-defined]
    resp = get(cp, "/v1/registry", tag)
    assert resp.status == 200
    assert resp.body["hosts"]["web-1"]["advertise"] == "10.0.0.2:7444"
    assert etag(resp) != tag  # same version, another body: another tag


def test_registry_cache_follows_a_version_that_went_back(cp: ControlPlane) -> None:
    """A restored database (or a lagging standby) has a lower version: cached for it, not rendered per request."""
    cp.register(PEER, "10.0.0.1:7444", {})
    cp.register(PEER, "10.0.0.2:7444", {})
    _raw_sql(cp, "UPDATE registry_state SET version = version - 1 WHERE id = 1")
    _tag, body = cp.registry_tagged()
    assert cp.registry_tagged()[1] is body  # the older version is cached like any other


def _raw_sql(plane: ControlPlane, statement: str) -> None:
    """Change the database behind the store's back (another program, a restore)."""
    engine = sa.create_engine(parse_url(plane.config.db))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()
