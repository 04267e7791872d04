"""``tapproof agent run`` settings: one checking function, messages that name the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapproof.agent import config
from tapproof.agent.config import Route, Service, check
from tapproof.errors import ConfigError


def _err(raw: dict[str, object], **kw: object) -> str:
    with pytest.raises(ConfigError) as exc:
        check(raw, **kw)  # type: ignore[arg-type]
    return str(exc.value)


def test_defaults() -> None:
    cfg = check({})
    assert cfg.listen_tunnel == "0.0.0.0:7444"
    assert cfg.admin == "127.0.0.1:7445"
    assert cfg.mode == "strict"
    assert cfg.transparent_port == 7447
    assert cfg.renew_fraction == 0.5
    assert cfg.sync_interval == 5.0


def test_services_and_routes_parse() -> None:
    cfg = check(
        {
            "service": ["redis=127.0.0.1:6379", "pg=unix:/run/postgresql/.s.PGSQL.5432", "v6=[::1]:80"],
            "route": ["127.0.0.1:6380=redis@hostb", "127.0.0.1:0=pg@db-1"],
        }
    )
    assert cfg.services[0] == Service("redis", "127.0.0.1", 6379)
    assert cfg.services[1].unix_path == "/run/postgresql/.s.PGSQL.5432"
    assert cfg.service("v6") == Service("v6", "::1", 80)
    assert cfg.routes == (Route("127.0.0.1", 6380, "redis", "hostb"), Route("127.0.0.1", 0, "pg", "db-1"))


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        ({"service": ["redis=10.0.0.5:6379"]}, "--unsafe-service-target"),
        ({"service": ["redis"]}, "--service"),
        ({"service": ["a=127.0.0.1:1", "a=127.0.0.1:2"]}, "--service"),
        ({"service": ["x=unix:relative.sock"]}, "--service"),
        ({"route": ["0.0.0.0:6380=redis@b"]}, "--unsafe-route-listen"),
        ({"route": ["127.0.0.1:6380=redis"]}, "--route"),
        ({"route": ["127.0.0.1:1=a@b", "127.0.0.1:1=c@d"]}, "--route"),
        ({"mode": "lax"}, "--mode"),
        ({"fleet_cidr": ["10.0.0.0/8"]}, "--fleet-cidr"),
        ({"transparent": True, "fleet_cidr": ["nope"]}, "--fleet-cidr"),
        ({"renew_fraction": 0.95}, "--renew-fraction"),
        ({"listen_tunnel": "127.0.0.1:7000", "admin": "127.0.0.1:7000"}, "--admin"),
        ({"listen_tunnel": "127.0.0.1:7000", "route": ["127.0.0.1:7000=a@b"]}, "--route"),
        ({"advertise": "0.0.0.0:7444"}, "--advertise"),
        ({"sync_interval": "10ms"}, "--sync-interval"),
        ({"listen_tunnel": "nohost"}, "--listen-tunnel"),
        ({"surprise": 1}, "surprise"),
        ({"expiry_warn": "150%"}, "--expiry-warn"),
        ({"expiry_warn": "leef=10d"}, "--expiry-warn"),
        ({"unsafe_classical_groups": 2}, "--unsafe-classical-groups"),
        ({"unsafe_service_target": ["yes"]}, "--unsafe-service-target"),
    ],
)
def test_each_bad_setting_names_its_flag(raw: dict[str, object], flag: str) -> None:
    assert flag in _err(raw, is_root=True)


def test_unsafe_flags_allow_what_they_name() -> None:
    cfg = check(
        {
            "service": ["r=10.0.0.5:6379"],
            "unsafe_service_target": True,
            "route": ["0.0.0.0:1=r@b"],
            "unsafe_route_listen": "true",
        }
    )
    assert cfg.services[0].host == "10.0.0.5"
    assert cfg.routes[0].listen_host == "0.0.0.0"


def test_transparent_needs_root() -> None:
    assert "--transparent" in _err({"transparent": True}, is_root=False)
    assert check({"transparent": True, "fleet_cidr": ["10.1.0.0/16"]}, is_root=True).fleet_cidrs == ("10.1.0.0/16",)


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('mode = "permissive"\nroute = ["127.0.0.1:1=a@b"]\nadmin = "127.0.0.1:9000"\n')
    env = {"TAPPROOF_ADMIN": "127.0.0.1:9001", "TAPPROOF_SERVICE": "x=127.0.0.1:1,y=127.0.0.1:2"}
    cfg = config.load(f, {"route": [], "admin": None, "listen_tunnel": "127.0.0.1:0"}, env)
    assert cfg.mode == "permissive"
    assert [r.service for r in cfg.routes] == ["a"]  # an empty flag list does not replace the file's
    assert cfg.admin == "127.0.0.1:9001"
    assert [s.name for s in cfg.services] == ["x", "y"]
    cfg = config.load(f, {"route": ["127.0.0.1:2=c@d"], "admin": ""}, env)
    assert [r.service for r in cfg.routes] == ["c"]
    assert cfg.admin == ""  # '' disables


def test_bad_file_names_config(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("mode = \n")
    with pytest.raises(ConfigError, match="--config"):
        config.load(f, {})
    f.write_text('listen = "x"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        config.load(f, {})


def test_expiry_warn_from_file_env_and_flag(tmp_path: Path) -> None:
    """One name everywhere: key ``expiry_warn``, variable ``TAPPROOF_EXPIRY_WARN``, flag ``--expiry-warn``."""
    assert check({}).expiry_warn == "25%"
    f = tmp_path / "agent.toml"
    f.write_text('expiry_warn = "30%,root=365d"\n')
    assert config.load(f, {"expiry_warn": None}, {}).expiry_warn == "30%,root=365d"
    env = {"TAPPROOF_EXPIRY_WARN": "intermediate=30d"}
    assert config.load(f, {"expiry_warn": None}, env).expiry_warn == "intermediate=30d"
    assert config.load(f, {"expiry_warn": "10%"}, env).expiry_warn == "10%"
    f.write_text('expiry_warn = "often"\n')
    with pytest.raises(ConfigError, match="--expiry-warn"):
        config.load(f, {}, {})
