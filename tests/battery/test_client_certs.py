"""The client-certificate matrix, against an agent's tunnel port and the control plane's API port.

Real processes: one ``tapproof server``, agent ``b`` fronting an echo service,
agent ``a`` with a route to it. Each bad certificate below is made with the
server's own intermediate CA (so only the one flaw makes it bad) or with
another CA, presented by a client whose OpenSSL security level is 0 (the
client must be able to *offer* RSA-1024 and SHA-1; the servers must refuse
them). For every case and both ports: the connection is refused, exactly one
structured log line carries the expected specific reason, its counter moves
by one, and nothing reaches a backend (the echo service's accept count and
the API's request count stay put). A valid certificate made the same way
passes (the control: each assertion can fail).

Revocation: a live tunnel of the revoked host is closed within 30 s, and its
certificate is refused on both ports afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from prometheus_client.parser import text_string_to_metric_families

from tapproof.agent.state import AgentPaths, load_credentials
from tapproof.errors import TapproofError
from tapproof.pki.ca import LocalCA, load_ca
from tapproof.tls.credentials import Credentials
from tapproof.tls.stream import TLSStream
from tapproof.tunnel.preamble import ClientPreamble
from tapproof.units import parse_hostport
from tests.integration import procs
from tests.pkifix import craft_leaf, host_creds, make_ca

pytestmark = [pytest.mark.integration]

TD = "example.org"
FAR = dt.timedelta(days=2)


@dataclasses.dataclass
class Lab:
    """The processes and the CA of this module."""

    srv: procs.ServerProc
    a: procs.AgentProc
    b: procs.AgentProc
    echo: procs.EchoServer
    ca: LocalCA
    tmp: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("certs")
    srv = procs.start_server(tmp / "srv", TD)
    echo = procs.EchoServer()
    agents: list[procs.AgentProc] = []
    try:
        b = procs.start_agent(tmp / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
        agents.append(b)
        a = procs.start_agent(tmp / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b")
        agents.append(a)
        yield Lab(srv, a, b, echo, load_ca(srv.data_dir, TD), tmp)
    finally:
        for ag in agents:
            ag.stop()
        srv.stop()
        echo.close()


# --- a client that can offer anything ------------------------------------------------------
def _client_ctx(creds: Credentials | None) -> SSL.Context:
    """TLS 1.3 + X25519MLKEM768 (what the servers require), security level 0 (so RSA-1024 and
    SHA-1 certificates can be offered), no server check (the server's refusal is under test)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    assert _lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519MLKEM768") == 1
    ctx.set_verify(SSL.VERIFY_NONE)
    if creds is not None:
        ctx.use_certificate(creds.leaf)
        for c in creds.chain[1:]:
            ctx.add_extra_chain_cert(c)
        ctx.use_privatekey(creds.key)
    return ctx


def attempt(addr: tuple[str, int], creds: Credentials | None, payload: bytes) -> bytes:
    """Handshake, send ``payload``, return what came back (b"" when refused)."""
    sock = socket.create_connection(addr, timeout=5)
    stream = TLSStream.client(_client_ctx(creds), sock)
    deadline = time.monotonic() + 5
    try:
        stream.handshake(deadline)  # TLS 1.3: the client finishes before the server judges its certificate
        stream.sendall(payload, deadline)
        return stream.recv(4096, deadline)
    except TapproofError:
        return b""
    finally:
        stream.abort()


TUNNEL_PAYLOAD = ClientPreamble("echo").request() + b"\r\nhello"
# A route the agents never call, so its request count is this test's alone.
API_PAYLOAD = b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
API_ROUTE = r"^/v1/openapi\.json$"


# --- what the servers report ------------------------------------------------------------------
def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - http://127.0.0.1 metrics
        text = resp.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def server_metric_at(metrics: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, at ``metrics`` (HOST:PORT)."""
    return sum(
        v
        for n, lb, v in _samples(f"http://{metrics}/metrics")
        if n == name and all(lb.get(k) == x for k, x in labels.items())
    )


def server_metric(lab: Lab, name: str, **labels: str) -> float:
    """The control plane's metric ``name`` (summed over the labels not given)."""
    return server_metric_at(lab.srv.metrics, name, **labels)


def refusal_lines(events: list[dict[str, object]], event: str, reason: str) -> int:
    return sum(1 for e in events if e.get("event") == event and e.get("reason") == reason)


@dataclasses.dataclass
class Port:
    """One of the two ports under test, with how it reports a refusal."""

    name: str
    address: Callable[[Lab], tuple[str, int]]
    payload: bytes
    log_event: str
    metric: Callable[[Lab, str], float]
    log: Callable[[Lab], list[dict[str, object]]]
    backend: Callable[[Lab], float]


TUNNEL = Port(
    "tunnel",
    lambda lab: lab.b.tunnel,
    TUNNEL_PAYLOAD,
    "tunnel-refused",
    lambda lab, reason: lab.b.metric("tapproof_agent_refusals_total", direction="inbound", reason=reason),
    lambda lab: lab.b.events(),
    lambda lab: float(lab.echo.connections),
)
API = Port(
    "api",
    lambda lab: parse_hostport(lab.srv.address),
    API_PAYLOAD,
    "handshake-refused",
    lambda lab, reason: server_metric(lab, "tapproof_server_handshakes_failed_total", reason=reason),
    lambda lab: procs.read_events(lab.srv.log_path),
    lambda lab: server_metric(lab, "tapproof_server_requests_total", route=API_ROUTE),
)


# --- the matrix --------------------------------------------------------------------------------
def _ku(**on: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(on)
    return x509.KeyUsage(**flags)


def _other_ca(lab: Lab) -> Credentials:
    return host_creds(
        make_ca(Path(tempfile.mkdtemp(dir=lab.tmp)), TD), "a"
    )  # same trust domain, same name, another root


CASES: dict[str, tuple[Callable[[Lab], Credentials | None], str]] = {
    # name: (the certificate, the reason both ports must log)
    "another-ca": (_other_ca, "untrusted"),
    "expired": (lambda lab: craft_leaf(lab.ca, not_before=_now() - FAR, not_after=_now() - FAR / 2), "expired"),
    "not-yet-valid": (
        lambda lab: craft_leaf(lab.ca, not_before=_now() + FAR / 2, not_after=_now() + FAR),
        "not-yet-valid",
    ),
    "dot-dot": (lambda lab: craft_leaf(lab.ca, [f"spiffe://{TD}/host/.."]), "bad-spiffe-id"),
    "percent-2f": (lambda lab: craft_leaf(lab.ca, [f"spiffe://{TD}/host/a%2Fb"]), "bad-spiffe-id"),
    "upper-case-td": (lambda lab: craft_leaf(lab.ca, [f"spiffe://{TD.upper()}/host/a"]), "bad-spiffe-id"),
    "trailing-slash": (lambda lab: craft_leaf(lab.ca, [f"spiffe://{TD}/host/a/"]), "bad-spiffe-id"),
    "two-uri-sans": (
        lambda lab: craft_leaf(lab.ca, [f"spiffe://{TD}/host/a", f"spiffe://{TD}/host/b"]),
        "bad-spiffe-id",
    ),
    "no-uri-san": (lambda lab: craft_leaf(lab.ca, []), "bad-spiffe-id"),
    "other-trust-domain": (lambda lab: craft_leaf(lab.ca, ["spiffe://other.org/host/a"]), "wrong-trust-domain"),
    "eku-server-only": (lambda lab: craft_leaf(lab.ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]), "bad-key-usage"),
    "ku-key-agreement-only": (lambda lab: craft_leaf(lab.ca, key_usage=_ku(key_agreement=True)), "bad-key-usage"),
    "ca-as-leaf": (lambda lab: craft_leaf(lab.ca, is_ca=True), "ca-as-leaf"),
    "rsa-1024": (lambda lab: craft_leaf(lab.ca, key=rsa.generate_private_key(65537, 1024)), "weak-key"),
    "sha1-signature": (lambda lab: craft_leaf(lab.ca, weak_hash="sha1"), "weak-signature"),
    "empty-certificate-message": (lambda _lab: None, "no-certificate"),
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.mark.parametrize("port", [TUNNEL, API], ids=lambda p: p.name)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_client_certificate_refused(lab: Lab, case: str, port: Port) -> None:
    make, reason = CASES[case]
    creds = make(lab)
    addr = port.address(lab)
    metric0, backend0 = port.metric(lab, reason), port.backend(lab)
    lines0 = refusal_lines(port.log(lab), port.log_event, reason)
    assert attempt(addr, creds, port.payload) == b""
    procs.wait_for(lambda: port.metric(lab, reason) == metric0 + 1, 10, f"{port.name} counts {reason}")
    # the counter is incremented before the line is written: wait for the line too
    procs.wait_for(
        lambda: refusal_lines(port.log(lab), port.log_event, reason) == lines0 + 1, 10, f"{port.name} logs {reason}"
    )
    assert port.backend(lab) == backend0  # no byte reached the echo service / no API request was handled


@pytest.mark.parametrize("port", [TUNNEL, API], ids=lambda p: p.name)
def test_valid_crafted_certificate_passes(lab: Lab, port: Port) -> None:
    """The control: the same recipe with nothing broken gets through to the backend."""
    backend0 = port.backend(lab)
    creds = craft_leaf(lab.ca, name="a")  # host "a" exists, so policy allows it
    answer = attempt(port.address(lab), creds, port.payload)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    procs.wait_for(lambda: port.backend(lab) > backend0, 10, f"{port.name} backend reached")


def test_revoked_host_refused_and_live_tunnel_closed(lab: Lab) -> None:
    a_creds = load_credentials(AgentPaths(lab.a.data_dir))
    assert attempt(lab.b.tunnel, a_creds, TUNNEL_PAYLOAD).startswith(b"HTTP/1.1 200")  # before: accepted
    live = socket.create_connection(lab.a.route(0), timeout=10)
    live.sendall(b"ping")
    assert live.recv(4) == b"ping"  # a live tunnel a -> b
    before = {p.name: (p.metric(lab, "revoked"), p.backend(lab)) for p in (TUNNEL, API)}
    start = time.monotonic()
    lab.srv.admin("revoke", "--host", "a", "--reason", "battery")  # the CLI itself takes ~1 s
    live.settimeout(30)
    try:
        ended = live.recv(1) == b""
    except OSError:
        ended = True  # reset
    closed_after = time.monotonic() - start
    live.close()
    assert ended
    assert closed_after < 30, closed_after
    print(f"live tunnel of the revoked host closed {closed_after:.1f} s after the revoke command started")
    procs.wait_for(lambda: lab.b.status()["revoked"]["hosts"] == ["a"], 10, "b knows a is revoked")
    for port in (TUNNEL, API):
        metric0, backend0 = before[port.name]
        lines0 = refusal_lines(port.log(lab), port.log_event, "revoked")
        assert attempt(port.address(lab), a_creds, port.payload) == b""
        procs.wait_for(lambda p=port, m=metric0: p.metric(lab, "revoked") >= m + 1, 10, f"{port.name} counts revoked")
        # >=: agent a's own control-plane calls are refused as revoked too, once a second
        assert refusal_lines(port.log(lab), port.log_event, "revoked") >= lines0 + 1
        assert port.backend(lab) == backend0
