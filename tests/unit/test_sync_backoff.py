"""The agent's poll interval: backs off while no server answers, capped, jittered, back to normal at once."""

from __future__ import annotations

import pytest

from tapproof.agent.sync import POLL_BACKOFF_MAX, poll_wait


@pytest.mark.parametrize("interval", [0.2, 1.0, 5.0, 60.0])
def test_poll_wait_doubles_to_a_cap_with_jitter(interval: float) -> None:
    cap = max(interval, min(POLL_BACKOFF_MAX, 8 * interval))
    for down in range(40):
        base = min(cap, interval * 2**down)
        waits = [poll_wait(interval, down) for _ in range(50)]
        assert all(0.9 * base <= w <= 1.1 * base for w in waits), (down, waits[:5])
    assert len({poll_wait(interval, 0) for _ in range(20)}) > 1  # jittered: a fleet does not poll in step


def test_poll_wait_normal_interval_when_up_and_never_below_it() -> None:
    assert 4.5 <= poll_wait(5.0, 0) <= 5.5
    assert poll_wait(5.0, 3) >= 0.9 * 30.0
    assert poll_wait(60.0, 10) <= 1.1 * 60.0  # an interval above the cap is not stretched
