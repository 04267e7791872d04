"""A handshake flood in its own process: ``python -m tests.battery.flood HOST:PORT KEY CERT BUNDLE RATE SECONDS``.

Each attempt is a full mutual TLS 1.3 + X25519MLKEM768 handshake with a valid
host certificate, then a clean close (close_notify) before any preamble: the
most expensive thing an outsider with a stolen-but-valid credential can make
an agent do per connection. Paced at RATE per second by a pool of threads
(bounded in count: RATE x SECONDS, and in time: none starts after SECONDS + 15,
each ends within its 10 s timeout). Prints one JSON line:

- ``planned`` (RATE x SECONDS) and ``submitted``: handshakes handed to the pool on their schedule;
- ``elapsed``: seconds the pacing took (before the pool drained: the offered rate, not the target's throughput);
- ``ran`` = ``ok`` + ``failed``, and ``skipped`` (still queued past the time bound);
- ``ok_in_window``: handshakes completed within SECONDS; ``drained``: seconds until the last one ended;
- the first errors.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tapproof.errors import PeerRejected, TransportError
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.tls.stream import connect


def main(argv: list[str]) -> int:
    """Run the flood; print the summary."""
    hostport, key, cert, bundle, rate_s, seconds_s = argv
    host, port = hostport.rsplit(":", 1)
    rate, seconds = float(rate_s), float(seconds_s)
    ctx = context.client_context(
        Credentials.load(Path(key), Path(cert)), TrustBundle.from_pem(Path(bundle).read_bytes())
    )
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    ok = ok_in_window = skipped = 0
    total = int(rate * seconds)
    start = time.monotonic()
    stop_at = start + seconds + 15

    def one() -> None:
        nonlocal ok, ok_in_window, skipped
        if time.monotonic() > stop_at:
            with lock:
                skipped += 1
            return
        try:
            stream = connect((host, int(port)), ctx, timeout=10)
            stream.close(time.monotonic() + 2)
        except (PeerRejected, TransportError, OSError) as exc:
            with lock:
                errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
            return
        with lock:
            ok += 1
            ok_in_window += int(time.monotonic() <= start + seconds)

    submitted = 0
    with ThreadPoolExecutor(32) as pool:
        for i in range(total):
            due = start + i / rate
            now = time.monotonic()
            if now > stop_at:
                break
            if due > now:
                time.sleep(due - now)
            pool.submit(one)
            submitted += 1
        elapsed = time.monotonic() - start
    drained = time.monotonic() - start
    failed = sum(errors.values())
    print(
        json.dumps(
            {
                "planned": total,
                "submitted": submitted,
                "elapsed": round(elapsed, 2),
                "ran": ok + failed,
                "ok": ok,
                "failed": failed,
                "skipped": skipped,
                "ok_in_window": ok_in_window,
                "drained": round(drained, 2),
                "errors": dict(errors.most_common(5)),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
