"""Policy evaluation (pure): deny wins; allow rules about a service lock others out; default otherwise."""

from __future__ import annotations

import pytest

from tapproof import identity
from tapproof.errors import ConfigError
from tapproof.policy import Rule, evaluate
from tapproof.policy.model import parse_ports, parse_service, parse_source

TD = "example.org"
WEB = identity.host_id(TD, "web-1")
BATCH = identity.host_id(TD, "batch-7")


def r(action: str, source: str, service: str, ports: str = "", rid: int = 1) -> Rule:
    return Rule(action, parse_source(source, TD), service, parse_ports(ports), rid)  # type: ignore[arg-type]


def test_default_allow_and_deny() -> None:
    assert evaluate([], WEB, "redis").allowed
    assert not evaluate([], WEB, "redis", default="deny").allowed


def test_allow_rule_locks_out_other_sources_for_that_service_only() -> None:
    rules = [r("allow", "host/web-*", "redis")]
    assert evaluate(rules, WEB, "redis").allowed
    d = evaluate(rules, BATCH, "redis")
    assert not d.allowed
    assert evaluate(rules, BATCH, "postgres").allowed  # other services: default


def test_deny_wins_over_allow() -> None:
    rules = [r("allow", "*", "*", rid=1), r("deny", "host/batch-*", "redis", rid=2)]
    assert evaluate(rules, WEB, "redis").allowed
    d = evaluate(rules, BATCH, "redis")
    assert not d.allowed
    assert d.rule_id == 2


def test_ports() -> None:
    rules = [r("allow", "host/web-1", "port-*", "6379,7000-7010")]
    assert evaluate(rules, WEB, "port-6379", 6379).allowed
    assert evaluate(rules, WEB, "port-7005", 7005).allowed
    assert not evaluate(rules, BATCH, "port-7005", 7005).allowed
    assert evaluate(rules, BATCH, "port-8080", 8080).allowed  # no rule about 8080: default


def test_segment_glob_does_not_cross_slash() -> None:
    rules = [r("allow", "host/*", "redis")]
    assert evaluate(rules, WEB, "redis").allowed
    svc = identity.service_id(TD, "x")
    assert not evaluate(rules, svc, "redis").allowed


@pytest.mark.parametrize("bad", ["", "spiffe://other.org/host/a", "/host/a", "host/../a", "a b", "https://x/y"])
def test_bad_sources(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_source(bad, TD)


@pytest.mark.parametrize("bad", ["0", "70000", "5-3", "a", "1,,2"])
def test_bad_ports(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_ports(bad)


def test_bad_service() -> None:
    with pytest.raises(ConfigError):
        parse_service("Redis!")


def test_port_scoped_rules_never_match_connections_without_a_port() -> None:
    """``allow host/web-1 -> * --ports 22`` must not open every named service to web-1."""
    rules = [r("allow", "host/web-1", "*", "22"), r("deny", "host/batch-*", "*", "22", rid=2)]
    assert not evaluate(rules, WEB, "redis", None, default="deny").allowed
    assert evaluate(rules, BATCH, "redis", None).allowed  # the port-22 deny is not about redis by name
    assert evaluate(rules, WEB, "port-22", 22, default="deny").allowed
