"""Transparent-mode inbound settings (``--protected-port``, ``--inbound-port``) and the plaintext handler.

The handler tests run on loopback without root: ``original_dst`` is injected.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tapproof.agent import config
from tapproof.agent.config import DEFAULT_INBOUND_PORT, check
from tapproof.agent.plaininbound import OTHER, PlainInbound, relay_plain
from tapproof.cli.main import build_parser
from tapproof.errors import ConfigError


def _err(raw: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as exc:
        check(raw, is_root=True)
    return str(exc.value)


T = {"transparent": True}


def test_defaults() -> None:
    cfg = check({})
    assert cfg.inbound_port == DEFAULT_INBOUND_PORT == 7448
    assert cfg.protected_ports == ()
    assert cfg.protected_port_set() == ()


def test_protected_ports_are_the_flag_list_plus_loopback_tcp_service_ports() -> None:
    cfg = check(
        {
            **T,
            "protected_port": [5432, "6379", 5432],
            "service": ["web=127.0.0.1:8080", "v6=[::1]:8443", "sock=unix:/run/x.sock", "r=127.0.0.1:6379"],
        },
        is_root=True,
    )
    assert cfg.protected_ports == (5432, 6379)  # duplicates dropped, order kept
    assert cfg.protected_port_set() == (5432, 6379, 8080, 8443)


def test_a_non_loopback_service_target_is_not_a_local_protected_port() -> None:
    cfg = check({**T, "service": ["r=10.0.0.5:6379"], "unsafe_service_target": True}, is_root=True)
    assert cfg.protected_port_set() == ()


def test_inbound_port_zero_is_allowed() -> None:
    assert check({**T, "inbound_port": 0}, is_root=True).inbound_port == 0
    assert check({**T, "inbound_port": "0"}, is_root=True).inbound_port == 0


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        ({"protected_port": [6379]}, "--protected-port"),  # only with --transparent
        ({**T, "protected_port": [0]}, "--protected-port"),
        ({**T, "protected_port": [70000]}, "--protected-port"),
        ({**T, "protected_port": ["redis"]}, "--protected-port"),
        ({**T, "protected_port": [True]}, "--protected-port"),
        ({**T, "inbound_port": -1}, "--inbound-port"),
        ({**T, "inbound_port": 65536}, "--inbound-port"),
        ({**T, "inbound_port": "x"}, "--inbound-port"),
        ({**T, "inbound_port": 7444}, "--inbound-port"),  # the tunnel port
        ({**T, "inbound_port": 7447}, "--inbound-port"),  # the transparent port
        ({**T, "admin": "127.0.0.1:7448"}, "--admin"),  # the inbound port
    ],
)
def test_each_bad_inbound_setting_names_its_flag(raw: dict[str, object], flag: str) -> None:
    assert flag in _err(raw)


@pytest.mark.parametrize(
    ("raw", "flag", "own"),
    [
        ({**T, "protected_port": [7444]}, "--protected-port", "--listen-tunnel"),
        ({**T, "listen_tunnel": "10.0.0.1:9000", "protected_port": [9000]}, "--protected-port", "--listen-tunnel"),
        ({**T, "protected_port": [7447]}, "--protected-port", "--transparent-port"),
        ({**T, "protected_port": [7448]}, "--protected-port", "--inbound-port"),
        ({**T, "protected_port": [7445]}, "--protected-port", "--admin"),
        # a service on the tunnel port (tunnel bound to another address) would get its port redirected
        ({**T, "listen_tunnel": "10.0.0.1:7444", "service": ["s=127.0.0.1:7444"]}, "--service", "--listen-tunnel"),
        ({**T, "service": ["s=127.0.0.1:7448"]}, "--service", "--inbound-port"),
    ],
)
def test_the_agents_own_ports_are_never_protected(raw: dict[str, object], flag: str, own: str) -> None:
    msg = _err(raw)
    assert msg.startswith(flag)
    assert own in msg


def test_own_port_rules_only_apply_in_transparent_mode() -> None:
    cfg = check({"listen_tunnel": "10.0.0.1:7444", "service": ["s=127.0.0.1:7444"]})
    assert cfg.protected_port_set() == (7444,)  # computed, but nothing is redirected without --transparent


def test_file_env_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("transparent = true\nprotected_port = [5432, 6379]\ninbound_port = 9448\n")
    env = {"TAPPROOF_PROTECTED_PORT": "1000,1001"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config.os, "geteuid", lambda: 0)
        cfg = config.load(f, {"protected_port": [], "inbound_port": None}, {})
        assert cfg.protected_ports == (5432, 6379)
        assert cfg.inbound_port == 9448
        assert config.load(f, {}, env).protected_ports == (1000, 1001)
        cfg = config.load(f, {"protected_port": [2000], "inbound_port": 0}, env)
        assert cfg.protected_ports == (2000,)
        assert cfg.inbound_port == 0
        f.write_text("transparent = true\nprotected_port = 5432\n")  # one port, not a list: accepted
        assert config.load(f, {}, {}).protected_ports == (5432,)
        f.write_text('transparent = true\nprotected_port = ["5432", "nope"]\n')
        with pytest.raises(ConfigError, match="--protected-port"):
            config.load(f, {}, {})


def test_cli_flags_reach_the_settings() -> None:
    args = build_parser().parse_args(
        ["agent", "run", "--data-dir", "/tmp/a", "--protected-port", "6379", "--protected-port", "5432",
         "--inbound-port", "0", "--transparent"]
    )  # fmt: skip
    assert args.protected_port == [6379, 5432]
    assert args.inbound_port == 0


# --- the plaintext inbound handler (loopback, original destination injected) --------------------------


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def service() -> Iterator[int]:
    """An echo-ish service on loopback: answers ``got:<request>`` after the client half-closes."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    data = b""
                    while chunk := conn.recv(65536):
                        data += chunk
                    conn.sendall(b"got:" + data)

    threading.Thread(target=serve, daemon=True).start()
    yield port
    srv.close()


def _handler(mode: str, port: int, dst_ip: str = "10.9.9.9", **kw: object) -> PlainInbound:
    cfg = check({"mode": mode, "service": [f"svc=127.0.0.1:{port}"]})
    rt = types.SimpleNamespace(config=cfg)
    return PlainInbound(rt, [port], lambda _s: (dst_ip, port), own_address=lambda ip: ip == dst_ip, **kw)


def _call(handler: PlainInbound, source: tuple[str, int] = ("10.9.9.1", 4000), payload: bytes = b"hello") -> bytes:
    """Drive one connection through ``handler``; return what the client read (or raise on reset)."""
    a, b = socket.socketpair()
    t = threading.Thread(target=handler, args=(b, source), daemon=True)
    t.start()
    a.settimeout(5)
    try:
        a.sendall(payload)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := a.recv(65536):
            out += chunk
        return out
    finally:
        a.close()
        t.join(5)


def test_strict_refuses_logs_and_counts(service: int, caplog: pytest.LogCaptureFixture) -> None:
    h = _handler("strict", service)
    before = _metric("tapproof_agent_refusals_total", direction="inbound", reason="plaintext-in-strict-mode")
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        assert _call(h) == b""
    after = _metric("tapproof_agent_refusals_total", direction="inbound", reason="plaintext-in-strict-mode")
    assert after == before + 1
    rec = next(r for r in caplog.records if getattr(r, "event", "") == "plaintext-refused")
    assert rec.reason == "plaintext-in-strict-mode"
    assert rec.source == "10.9.9.1:4000"
    assert rec.original_dst == f"10.9.9.9:{service}"
    assert h.status()["refused"] == {"plaintext-in-strict-mode": 1}


def test_permissive_forwards_to_the_local_service_with_half_close_and_counts_the_source(service: int) -> None:
    h = _handler("permissive", service)
    before = _metric("tapproof_agent_plaintext_inbound_total", source="10.9.9.1")
    big = b"x" * (3 * 1024 * 1024 + 7)
    assert _call(h, payload=big) == b"got:" + big  # the answer comes after our half-close
    assert _metric("tapproof_agent_plaintext_inbound_total", source="10.9.9.1") == before + 1
    st = h.status()
    assert st["accepted"] == 1
    assert st["by_source"] == {"10.9.9.1": 1}
    assert st["active"] == 0


def test_permissive_still_refuses_what_was_not_redirected_to_a_protected_port(service: int) -> None:
    h = _handler("permissive", service)
    h.own_address = lambda _ip: False  # e.g. routed traffic for another host
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        assert _call(h) == b""
    h2 = PlainInbound(
        types.SimpleNamespace(config=check({"mode": "permissive"})), [1], lambda _s: ("10.9.9.9", service)
    )
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        assert _call(h2) == b""  # original port not protected (a direct connection to the inbound port)
    assert h.status()["refused"] == {"not-redirected": 1}
    assert h2.status()["refused"] == {"not-redirected": 1}


def test_source_label_cardinality_is_bounded(service: int) -> None:
    h = _handler("permissive", service, max_sources=2)
    for i in range(4):
        assert _call(h, source=(f"10.9.8.{i}", 1)) == b"got:hello"
    assert h.status()["by_source"] == {"10.9.8.0": 1, "10.9.8.1": 1, OTHER: 2}


def test_relay_plain_reports_bytes_each_way() -> None:
    a_client, a = socket.socketpair()
    b, b_server = socket.socketpair()
    result: list[tuple[int, int, bool]] = []
    t = threading.Thread(target=lambda: result.append(relay_plain(a, b)), daemon=True)
    t.start()
    a_client.sendall(b"ping")
    a_client.shutdown(socket.SHUT_WR)
    assert b_server.recv(10) == b"ping"
    assert b_server.recv(10) == b""  # half-close passed on
    b_server.sendall(b"pong!")
    b_server.close()
    assert a_client.recv(10) == b"pong!"
    t.join(5)
    assert result == [(4, 5, True)]
    a_client.close()
