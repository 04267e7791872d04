"""dial_peer refuses a revoked host before any connection (check_peer only sees revoked serials)."""

from __future__ import annotations

import socket
import types
from typing import Any, cast

import pytest

from tapproof.agent.peerdial import DialRefused, dial_peer


def test_a_revoked_host_is_refused_before_connecting() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(0.5)
        policy = types.SimpleNamespace(revoked_hosts=frozenset({"b"}), revoked_serials=frozenset())
        rt = types.SimpleNamespace(trust_domain="example.org", policy=policy, mark=None)
        with pytest.raises(DialRefused) as info:
            dial_peer(cast("Any", rt), "b", srv.getsockname()[:2], cast("Any", None), prepare=lambda _c: None)
        assert info.value.reason == "peer-revoked"
        with pytest.raises(TimeoutError):
            srv.accept()  # nothing dialed
