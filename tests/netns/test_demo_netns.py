"""``tapproof demo --netns``: the real-capture story holds and nothing is left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tapproof.demo.orchestrate import Demo, DemoOptions
from tests.helpers import require_root, require_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_netns_demo_passes_and_cleans_up(tmp_path: Path) -> None:
    require_root()
    require_tool("ip", "tcpdump")
    demo = Demo(DemoOptions(out=tmp_path / "out", netns=True))
    result = demo.run()
    assert result.failures == []
    before, after = result.runs
    assert before.capture.canary_seen
    assert before.capture.grade == "F"
    assert not after.capture.canary_seen
    assert after.capture.pq
    assert after.capture.grade == "A"
    assert result.seconds < 60
    assert demo.lab is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(ns in listed for ns in demo.lab.namespaces)
    assert not demo.tmp.exists()
