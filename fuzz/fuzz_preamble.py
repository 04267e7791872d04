"""Fuzz target for the CONNECT preamble parsers.

With atheris installed::

    python fuzz/fuzz_preamble.py -atheris_runs=100000

Without it, running this file loops over random (and mutated valid) inputs for
a bounded time and count: ``python fuzz/fuzz_preamble.py [--seconds N] [--runs N]``.
The property: any bytes either yield an event or raise RemoteProtocolError.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from tapproof.errors import RemoteProtocolError
from tapproof.tunnel.preamble import ClientPreamble, ServerPreamble

_SEEDS = [
    b"CONNECT redis HTTP/1.1\r\nHost: redis\r\n\r\n",
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n"
    b"Tapproof-Source: 10.0.0.1:5000\r\nTapproof-Request-Id: r1\r\n\r\npayload",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n",
]


def TestOneInput(data: bytes) -> None:  # atheris's required name
    """Feed ``data`` (split at a data-chosen point) to both machines."""
    cut = data[0] % (len(data) + 1) if data else 0
    for machine in (ServerPreamble(), ClientPreamble("redis")):
        try:
            if machine.feed(data[:cut]) is None and machine.feed(data[cut:]) is None:
                machine.feed_eof()
        except RemoteProtocolError:
            pass


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    buf = bytearray(seed)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == 1:
            buf[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2:
            buf[pos:pos] = rng.choice([b"\r\n", b"\n", b"\r", b" ", b":", b"\t", b"\x00"])
        else:
            buf[pos:pos] = buf[: rng.randint(0, 64)]
    return bytes(buf)


def run_random(seconds: float, runs: int, seed: int) -> int:
    """Loop over random inputs for at most ``seconds`` and ``runs``; return the count."""
    rng = random.Random(seed)  # noqa: S311 (fuzz inputs, not secrets)
    deadline = time.monotonic() + seconds
    done = 0
    while done < runs and time.monotonic() < deadline:
        use_random = rng.random() < 0.5
        data = rng.randbytes(rng.randint(0, 300)) if use_random else _mutate(rng, rng.choice(_SEEDS))
        TestOneInput(data)
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    """Run under atheris if installed, else the bounded random loop."""
    args = sys.argv[1:] if argv is None else argv
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--seconds", type=float, default=10.0)
        parser.add_argument("--runs", type=int, default=1_000_000)
        parser.add_argument("--seed", type=int, default=0)
        ns = parser.parse_args(args)
        n = run_random(ns.seconds, ns.runs, ns.seed)
        print(f"fuzz_preamble: {n} inputs, no unexpected exception")
        return 0
    atheris.Setup([sys.argv[0], *args], TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
