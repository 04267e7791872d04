"""Saving credentials: once ``current`` is switched, a failing convenience link never undoes it."""

from __future__ import annotations

from pathlib import Path

from tapproof.agent.state import AgentPaths, load_credentials, save_credentials
from tests.pkifix import host_creds, make_ca


def test_a_failing_convenience_link_keeps_the_new_pair(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    root = tmp_path / "agent"
    root.mkdir()
    paths = AgentPaths(root)
    first = host_creds(ca, "a")
    save_credentials(paths, first)
    (root / "key.pem").unlink()
    (root / "key.pem").mkdir()  # a link can no longer be renamed over it
    (root / "key.pem" / "x").write_text("x")
    second = host_creds(ca, "a")
    gen = save_credentials(paths, second)  # must not raise: the pair is saved
    assert gen.is_dir()
    loaded = load_credentials(paths)
    assert loaded.leaf.serial_number == second.leaf.serial_number
    assert (root / "cert.pem").resolve() == (gen / "cert.pem").resolve()
