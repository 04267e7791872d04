"""A bounded random + mutation fuzz loop for targets with atheris's ``TestOneInput`` shape.

Used when atheris is not installed (its wheels do not exist for every Python);
any exception a target does not expect propagates and is saved as a crash file
so it can become a regression test.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """A few byte-level edits of ``seed``."""
    buf = bytearray(seed)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == 1:
            buf[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2:
            buf[pos:pos] = rng.choice([b"\r\n", b"\n", b" ", b":", b"\x00", b"\xff", b'"', b"{", b"."])
        elif op == 3 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        else:
            buf[pos:pos] = buf[: rng.randint(0, 64)]
    return bytes(buf)


def run(
    target: Callable[[bytes], None],
    seeds: Sequence[bytes],
    *,
    seconds: float,
    runs: int = 10_000_000,
    seed: int = 0,
    crash_dir: Path | None = None,
) -> int:
    """Run ``target`` on random and mutated inputs for at most ``seconds``/``runs``; return the count."""
    try:
        return _loop(target, seeds, seconds=seconds, runs=runs, seed=seed, crash_dir=crash_dir)
    finally:
        close = getattr(target, "close", None)  # targets that own resources (temp dirs, stores)
        if callable(close):
            close()


def _loop(
    target: Callable[[bytes], None],
    seeds: Sequence[bytes],
    *,
    seconds: float,
    runs: int,
    seed: int,
    crash_dir: Path | None,
) -> int:
    rng = random.Random(seed)  # noqa: S311 - fuzz inputs, not secrets
    deadline = time.monotonic() + seconds
    done = 0
    while done < runs and time.monotonic() < deadline:
        data = mutate(rng, rng.choice(seeds)) if seeds and rng.random() < 0.7 else rng.randbytes(rng.randint(0, 400))
        try:
            target(data)
        except Exception:
            if crash_dir is not None:
                crash_dir.mkdir(parents=True, exist_ok=True)
                (crash_dir / f"crash-{done}.bin").write_bytes(data)
                (crash_dir / f"crash-{done}.txt").write_text(traceback.format_exc())
            raise
        done += 1
    return done
