"""Bad input at volume and oversized input, against real agents and a real control plane.

Volume: 10,000 connections to an agent's tunnel port and 2,000 to the API port,
each carrying one of: random bytes, a real ClientHello cut short, a real
ClientHello with flipped bits, plaintext HTTP, an SSH banner, a plaintext
``CONNECT``, nothing. Every one must end in an alert or a close (never a
hang, never a plaintext answer), count as one refusal in the metrics, and
reach no backend; descriptors and threads return to their baseline.

Oversized: a 100 KB client certificate chain, a 64 KiB ClientHello, 1 MiB of
HTTP headers, a 4 MiB body (declared and chunked), a 1 MiB ``CONNECT``
preamble: each refused, 16 at a time, with a bounded rise of the target's
peak RSS (VmHWM, reset before each case). Bound: :data:`RSS_BOUND` (256 KiB
per connection), a quarter of what the 1 MiB inputs weigh, so a server that
buffered even a quarter of them fails; its limits (8 KiB preamble head,
64 KiB HTTP head, OpenSSL's 100 KB certificate list) keep the rise to thread
stacks and TLS buffers. A chunked body is the exception: the API may hold up
to its 1 MiB body limit per connection before it can refuse (bound: that,
plus 512 KiB, per connection; 4 MiB offered each).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import itertools
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tapproof.control import api, httpserver, tlsctx
from tapproof.errors import PeerRejected, TransportError
from tapproof.pki import keys
from tapproof.pki.ca import load_ca
from tapproof.tls import context
from tapproof.tls.credentials import Credentials
from tapproof.tls.stream import TLSStream, connect
from tests.battery import loadkit
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TUNNEL_INPUTS = 10_000
API_INPUTS = 2_000
CONCURRENCY = 32
PER_CONNECTION_TIMEOUT = 20.0  # above both handshake deadlines (agent 10 s, server 5 s): a hang shows as a timeout
PARALLEL_OVERSIZED = 16
RSS_BOUND = 4 << 20


BASELINE: dict[int, tuple[int, int]] = {}


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[loadkit.Bed]:
    loadkit.raise_nofile(8192)
    b = loadkit.Bed(tmp_path_factory.mktemp("abuse"))
    loadkit.tunnel_once(b.route)  # warm: first tunnel, registry, metrics threads
    time.sleep(1)
    for pid in (b.b.proc.pid, b.srv.proc.pid):
        BASELINE[pid] = loadkit.fds(pid), loadkit.threads(pid)
    try:
        yield b
    finally:
        b.close()


# --- volume ----------------------------------------------------------------------------------
def _inputs(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    hello = loadkit.client_hello()
    kinds: list[tuple[str, Callable[[], bytes]]] = [
        ("random", lambda: rng.randbytes(rng.randint(1, 2048))),
        ("truncated-hello", lambda: hello[: rng.randint(1, len(hello) - 1)]),
        ("mutated-hello", lambda: _flip(rng, hello)),
        ("http", lambda: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n"),
        ("ssh-banner", lambda: b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"),
        ("plaintext-connect", lambda: b"CONNECT echo HTTP/1.1\r\nHost: echo\r\n\r\nping\n"),
        ("empty", lambda: b""),
    ]
    out = []
    for i in range(n):
        kind, make = kinds[i % len(kinds)]
        out.append((kind, make()))
    return out


def _flip(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _poke(addr: tuple[str, int], payload: bytes) -> str:
    """Send ``payload``, half-close, read to the end: ``alert``, ``close``, ``handshake-then-close``, or a failure."""
    got = b""
    try:
        with socket.create_connection(addr, timeout=PER_CONNECTION_TIMEOUT) as s:
            s.settimeout(PER_CONNECTION_TIMEOUT)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except OSError as exc:
                # The agent closed with a reset before our half-close (its refusal was already
                # made): ENOTCONN here is a close, not a failure of the agent.
                if exc.errno != errno.ENOTCONN:
                    raise
                return "close"
            while True:
                part = s.recv(65536)
                if not part:
                    break
                got += part
    except ConnectionResetError:
        pass
    except TimeoutError:
        return "TIMEOUT (no close)"
    if not got:
        return "close"
    if got[0] == 0x15:
        return "alert"
    if got[0] == 0x16 and got[1:3] == b"\x03\x03":
        return "handshake-then-close"  # a ClientHello that survived its bit flips got a ServerHello; then no cert
    return f"PLAINTEXT ANSWER {got[:40]!r}"


def _volume(addr: tuple[str, int], inputs: list[tuple[str, bytes]]) -> Counter[str]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda item: (item[0], _poke(addr, item[1])), inputs))
    return Counter(f"{kind}: {outcome}" for kind, outcome in results)


def _refusals(bed: loadkit.Bed) -> float:
    return loadkit.metric_sum(bed.b.addresses["admin"], "tapproof_agent_refusals_total", direction="inbound")


def test_bad_input_at_volume_on_the_tunnel_port(bed: loadkit.Bed) -> None:
    pid = bed.b.proc.pid
    fds0, threads0 = loadkit.fds(pid), loadkit.threads(pid)
    refused0, accepted0 = _refusals(bed), bed.echo.accepted
    start = time.monotonic()
    outcomes = _volume(bed.b.tunnel, _inputs(TUNNEL_INPUTS, seed=7))
    took = time.monotonic() - start
    print(f"tunnel port: {TUNNEL_INPUTS} bad inputs in {took:.1f}s: {dict(sorted(outcomes.items()))}")
    bad = {k: v for k, v in outcomes.items() if k.split(": ", 1)[1] not in ("alert", "close", "handshake-then-close")}
    assert not bad, bad
    assert bed.echo.accepted == accepted0, "a bad input reached the backend"
    procs.wait_for(lambda: _refusals(bed) - refused0 >= TUNNEL_INPUTS, 30, "one refusal counted per input")
    assert _refusals(bed) - refused0 == TUNNEL_INPUTS
    assert bed.b.proc.poll() is None
    fds1, threads1 = loadkit.settle(pid, fds0, threads0)
    print(f"agent b: fds {fds0} -> {fds1}, threads {threads0} -> {threads1}")
    assert "Traceback" not in bed.b.log_path.read_text(errors="replace")
    # the agent still serves a real tunnel
    assert loadkit.tunnel_once(bed.route)[0] > 0


@contextlib.contextmanager
def _agents_frozen(bed: loadkit.Bed) -> Iterator[None]:
    """SIGSTOP agents a and b (the bed's own processes) and wait until none of their API calls is open.

    The agents poll the server every second; under the flood one poll may time out and count as a failed
    handshake, which would make the per-input count below off by one. Each call is one connection
    (``Connection: close``), so once the server holds no connection none is half-done; a call frozen
    mid-handshake fails within the server's handshake timeout, before the count's baseline.
    """
    pids = [bed.a.proc.pid, bed.b.proc.pid]
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        procs.wait_for(
            lambda: loadkit.metric_sum(bed.srv.metrics, "tapproof_server_connections") == 0,
            httpserver.IDLE_TIMEOUT + httpserver.HANDSHAKE_TIMEOUT + 10,
            "the frozen agents' API connections to end",
        )
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def test_bad_input_at_volume_on_the_api_port(bed: loadkit.Bed) -> None:
    pid = bed.srv.proc.pid
    fds0, threads0 = loadkit.fds(pid), loadkit.threads(pid)
    with _agents_frozen(bed):  # only the test's inputs reach the API while it counts
        failed0 = loadkit.metric_sum(bed.srv.metrics, "tapproof_server_handshakes_failed_total")
        start = time.monotonic()
        outcomes = _volume(bed.api, _inputs(API_INPUTS, seed=11))
        took = time.monotonic() - start
        print(f"API port: {API_INPUTS} bad inputs in {took:.1f}s: {dict(sorted(outcomes.items()))}")
        bad = {
            k: v for k, v in outcomes.items() if k.split(": ", 1)[1] not in ("alert", "close", "handshake-then-close")
        }
        assert not bad, bad

        def counted() -> float:
            return loadkit.metric_sum(bed.srv.metrics, "tapproof_server_handshakes_failed_total") - failed0

        procs.wait_for(lambda: counted() >= API_INPUTS, 30, "one refused handshake counted per input")
        assert counted() == API_INPUTS
    assert bed.srv.proc.poll() is None
    fds1, threads1 = loadkit.settle(pid, fds0, threads0)
    print(f"server: fds {fds0} -> {fds1}, threads {threads0} -> {threads1}")
    assert "Traceback" not in bed.srv.log()
    assert "b" in bed.srv.admin("status", "--json")


# --- oversized -------------------------------------------------------------------------------
def _parallel(n: int, fn: Callable[[int], str]) -> list[str]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


def _peak_rise(pid: int, run: Callable[[], list[str]]) -> tuple[int, list[str]]:
    time.sleep(0.5)
    loadkit.reset_peak(pid)
    before = loadkit.peak_rss(pid)
    results = run()
    return loadkit.peak_rss(pid) - before, results


def _junk_cert(size: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "junk")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), bytes(size)), False)
        .sign(key, hashes.SHA256())
    )


def _tunnel_refusals(bed: loadkit.Bed, reason: str) -> int:
    return sum(1 for e in bed.b.events("tunnel-refused") if e.get("reason") == reason)


def test_a_100kb_certificate_chain_is_refused(bed: loadkit.Bed) -> None:
    creds = bed.client_creds("big-chain")
    junk = tuple(_junk_cert(10_000) for _ in range(11))
    big = Credentials(creds.key, (*creds.chain, *junk))
    chain_bytes = sum(len(c.public_bytes(serialization.Encoding.DER)) for c in big.chain)
    assert chain_bytes > 100_000
    ctx = context.client_context(big, load_ca(bed.srv.data_dir, "example.org").bundle)
    accepted0, refused0 = bed.echo.accepted, _refusals(bed)

    def one(_i: int) -> str:
        try:
            stream = connect(bed.b.tunnel, ctx, timeout=15)
        except (PeerRejected, TransportError) as exc:
            return f"refused at handshake: {type(exc).__name__}"
        try:  # TLS 1.3: the client finishes first; the server's refusal arrives after
            stream.sendall(b"CONNECT echo HTTP/1.1\r\nHost: echo\r\n\r\n", time.monotonic() + 10)
            answer = stream.recv(1024, time.monotonic() + 15)
        except TransportError as exc:
            return f"refused after handshake: {exc}"[:40]
        finally:
            stream.abort()
        return f"ANSWER {answer!r}" if answer else "refused after handshake: close"

    rise, results = _peak_rise(bed.b.proc.pid, lambda: _parallel(PARALLEL_OVERSIZED, one))
    print(f"100 KB chain ({chain_bytes} bytes) x{PARALLEL_OVERSIZED}: {Counter(results)}, peak RSS +{rise >> 10} KiB")
    assert all(r.startswith("refused") for r in results), results
    assert bed.echo.accepted == accepted0
    procs.wait_for(lambda: _refusals(bed) - refused0 >= PARALLEL_OVERSIZED, 15, "the refusals counted")
    assert rise < RSS_BOUND


@pytest.mark.parametrize(("size", "allowed"), [(65_000, {"handshake-then-close"}), (200_000, {"alert", "close"})])
def test_a_huge_client_hello_is_refused(bed: loadkit.Bed, size: int, allowed: set[str]) -> None:
    """64 KiB, well formed (unknown extensions): OpenSSL reads it (its cap is 131,396 bytes) and answers, then the
    agent refuses the connection for want of a client certificate. 200 KB (past every length field, malformed):
    refused outright. Either way one refusal each, no backend, bounded memory."""
    hello = loadkit.grown_client_hello(size)
    assert len(hello) >= size
    refused0, accepted0 = _refusals(bed), bed.echo.accepted

    def run() -> list[str]:
        return _parallel(PARALLEL_OVERSIZED, lambda _i: _poke(bed.b.tunnel, hello))

    rise, results = _peak_rise(bed.b.proc.pid, run)
    print(f"{len(hello)}-byte ClientHello x{PARALLEL_OVERSIZED}: {Counter(results)}, peak RSS +{rise >> 10} KiB")
    assert set(results) <= allowed, results
    procs.wait_for(lambda: _refusals(bed) - refused0 >= PARALLEL_OVERSIZED, 15, "the refusals counted")
    assert bed.echo.accepted == accepted0
    assert rise < RSS_BOUND


def _api_stream(bed: loadkit.Bed) -> TLSStream:
    """A TLS connection to the API with a self-signed bootstrap certificate (what enrollment uses)."""
    ctx = context.client_context(None, load_ca(bed.srv.data_dir, "example.org").bundle)
    key = keys.generate()
    ctx.use_certificate(tlsctx.bootstrap_certificate(key))
    ctx.use_privatekey(key)
    return connect(bed.api, ctx, timeout=15)


def _send_and_read(stream: TLSStream, head: bytes, filler: Callable[[], Iterator[bytes]]) -> str:
    """Send ``head`` then the filler's chunks until an answer arrives or the server closes; the status line.

    One thread per connection (a pyOpenSSL connection is not safe to read and
    write from two threads): after each chunk, whatever the server answered so far is read.
    """
    got = b""

    def poll(wait: float) -> bool:
        nonlocal got
        try:
            while b"\r\n" not in got:
                part = stream.recv(4096, time.monotonic() + wait)
                if not part:
                    return True
                got += part
        except TransportError:
            return b"\r\n" in got
        return True

    try:
        for chunk in itertools.chain([head], filler()):
            try:
                stream.sendall(chunk, time.monotonic() + 10)
            except TransportError:
                break
            if poll(0.0):
                break
        poll(10.0)
    finally:
        stream.abort()
    return got.split(b"\r\n", 1)[0].decode("latin-1") or "close"


# case: (head, body chunks, expected status lines, bound on the server's peak RSS rise for 16 connections)
OVERSIZED_HTTP: dict[str, tuple[bytes, Callable[[], Iterator[bytes]], set[str], int]] = {
    "1 MiB of headers": (
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\n",
        lambda: (b"X-Pad-%05d: %s\r\n" % (i, b"a" * 1000) for i in range(1024)),
        {"HTTP/1.1 431 ", "HTTP/1.1 400 "},
        RSS_BOUND,
    ),
    "a declared 4 MiB body": (
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4194304\r\n\r\n",
        lambda: (b"a" * 65536 for _ in range(64)),
        {"HTTP/1.1 413 "},
        RSS_BOUND,
    ),
    # Chunked: the length is unknown until the body passes the limit, so each connection may hold up to
    # api.MAX_BODY (1 MiB) before its 413: the bound is that per connection plus 512 KiB, for 4 MiB offered each.
    "a chunked 4 MiB body": (
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        lambda: (b"10000\r\n" + b"a" * 65536 + b"\r\n" for _ in range(64)),
        {"HTTP/1.1 413 "},
        PARALLEL_OVERSIZED * (api.MAX_BODY + (512 << 10)),
    ),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED_HTTP))
def test_oversized_http_on_the_api_is_refused(bed: loadkit.Bed, case: str) -> None:
    head, filler, statuses, bound = OVERSIZED_HTTP[case]

    def run() -> list[str]:
        return _parallel(PARALLEL_OVERSIZED, lambda _i: _send_and_read(_api_stream(bed), head, filler))

    rise, results = _peak_rise(bed.srv.proc.pid, run)
    print(f"{case} x{PARALLEL_OVERSIZED}: {Counter(results)}, server peak RSS +{rise >> 10} KiB")
    assert all(any(r.startswith(s) for s in statuses) for r in results), results
    assert rise < bound
    assert bed.srv.proc.poll() is None


def test_a_huge_connect_preamble_is_refused(bed: loadkit.Bed) -> None:
    ctx = bed.client_context("preamble-prober")
    accepted0, bad0 = bed.echo.accepted, _tunnel_refusals(bed, "bad-preamble")
    cases = [
        (b"CONNECT " + b"a" * (1 << 20), lambda: iter(())),  # one 1 MiB request line
        (b"CONNECT echo HTTP/1.1\r\n", lambda: (b"X-Pad: %s\r\n" % (b"a" * 1000) for _ in range(1024))),  # 1 MiB head
    ]

    def one(i: int) -> str:
        head, filler = cases[i % 2]
        return _send_and_read(connect(bed.b.tunnel, ctx, timeout=15), head, filler)

    rise, results = _peak_rise(bed.b.proc.pid, lambda: _parallel(PARALLEL_OVERSIZED, one))
    print(f"1 MiB CONNECT preamble x{PARALLEL_OVERSIZED}: {Counter(results)}, agent peak RSS +{rise >> 10} KiB")
    assert all(r.startswith("HTTP/1.1 400 ") for r in results), results
    assert bed.echo.accepted == accepted0
    procs.wait_for(
        lambda: _tunnel_refusals(bed, "bad-preamble") - bad0 >= PARALLEL_OVERSIZED, 15, "bad-preamble refusals"
    )
    assert rise < RSS_BOUND


def test_descriptors_back_after_every_case(bed: loadkit.Bed) -> None:
    """Runs last in the module: nothing from the cases above is left open on the agent or the server."""
    for pid, (fds0, threads0) in BASELINE.items():
        fds1, threads1 = loadkit.settle(pid, fds0, threads0)
        print(f"pid {pid}: fds {fds0} -> {fds1}, threads {threads0} -> {threads1}")
    assert bed.b.proc.poll() is None
    assert bed.srv.proc.poll() is None
