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
        # a fixed count (not a rate): every input must be handled; the time cap only bounds a stuck target
        assert run(factory(), seeds, seconds=60.0, runs=300, seed=1) == 300
    finally:
        logging.disable(logging.NOTSET)
