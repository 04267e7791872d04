"""The agent's caches: policy (fail closed until known), revocations, registry, renewal timing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tapproof.agent.policycache import PolicyCache, parse_policy
from tapproof.agent.registry import RegistryCache
from tapproof.identity import host_id, parse
from tapproof.pki import certs, keys
from tapproof.tls.credentials import Credentials

POLICY = {
    "version": "3-allow",
    "default": "allow",
    "rules": [
        {"id": 1, "action": "deny", "source": "spiffe://td/host/evil", "service": "*", "ports": "", "comment": ""}
    ],
}


def test_policy_fails_closed_until_known_then_persists(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    cache = PolicyCache(path)
    good, evil = host_id("td", "good"), host_id("td", "evil")
    assert not cache.decide(good, "redis", None).allowed
    assert cache.set_policy(parse_policy(POLICY, '"3-allow"'))
    assert cache.decide(good, "redis", None).allowed
    assert not cache.decide(evil, "redis", None).allowed
    new_s, new_h = cache.set_revocations({"serials": ["AB01"], "hosts": ["gone"]})
    assert new_s == {"ab01"}
    assert new_h == {"gone"}
    again = PolicyCache(path)  # a restart while the server is down
    assert again.policy is not None
    assert again.policy.version == "3-allow"
    assert not again.decide(evil, "redis", None).allowed
    assert again.is_revoked("AB01", "x")
    assert again.is_revoked("00", "gone")
    assert not again.is_revoked("00", "x")


def test_registry_cache_resolves_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    reg = RegistryCache(path)
    assert reg.advertise("b") is None
    data = {
        "hosts": {
            "b": {"advertise": "10.0.0.2:7444", "revoked": False},
            "r": {"advertise": "10.0.0.9:7444", "revoked": True},
        },
        "services": [],
    }
    assert reg.update(data)
    assert not reg.update(data)
    assert reg.advertise("b") == ("10.0.0.2", 7444)
    assert reg.advertise("r") is None  # revoked hosts are never dialled
    assert reg.host_for_ip("10.0.0.2") == "b"
    assert reg.host_for_ip("10.0.0.9") is None
    assert RegistryCache(path).advertise("b") == ("10.0.0.2", 7444)


def test_renewal_due_counts_from_issuance_not_the_backdate() -> None:
    root_key = keys.generate("ecdsa-p256")
    now = dt.datetime.now(dt.UTC)
    root = certs.make_root(root_key, "td", now, dt.timedelta(days=1))
    key = keys.generate("ecdsa-p256")
    leaf = certs.make_leaf(key.public_key(), parse("spiffe://td/host/a"), root_key, root, now, dt.timedelta(minutes=1))
    creds = Credentials(key, (leaf,))
    assert not creds.renewal_due(now + dt.timedelta(seconds=5), 0.5)
    assert not creds.renewal_due(now + dt.timedelta(seconds=28), 0.5)
    assert creds.renewal_due(now + dt.timedelta(seconds=31), 0.5)


def test_half_corrupt_policy_cache_loads_nothing(tmp_path: Path) -> None:
    """A cache whose revocations do not parse must not yield its policy without them."""
    import json

    path = tmp_path / "policy.json"
    cache = PolicyCache(path)
    cache.set_policy(parse_policy(POLICY, '"3-allow"'))
    cache.set_revocations({"serials": ["ab01"], "hosts": []})
    data = json.loads(path.read_text())
    data["revocations"] = {"serials": ["ab01"]}  # "hosts" lost
    path.write_text(json.dumps(data))
    again = PolicyCache(path)
    assert again.policy is None
    assert not again.decide(host_id("td", "good"), "redis", None).allowed  # fails closed: no-policy-yet
