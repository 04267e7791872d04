"""The short form of ``make fuzz``: every fuzz target for a couple of seconds on each run of the suite."""

from __future__ import annotations

import logging

import pytest
from fuzz.runner import run
from fuzz.targets import TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_short(name: str) -> None:
    factory, seeds = TARGETS[name]
    logging.disable(logging.CRITICAL)
    try:
        assert run(factory(), seeds, seconds=2.0, seed=1) > 100
    finally:
        logging.disable(logging.NOTSET)
