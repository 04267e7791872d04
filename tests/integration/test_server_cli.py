"""The control plane as a user drives it: real `tapproof server` process, real CLI, real enrollment."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tapproof.agent.enroll import enroll
from tapproof.agent.renew import client_for, renew
from tapproof.agent.state import AgentPaths
from tapproof.control import api
from tapproof.control.client import enroll_pinned
from tapproof.control.joinstring import JoinString, parse
from tapproof.errors import APIError, PeerRejected, TapproofError, TransportError
from tapproof.pki import csr, keys
from tapproof.units import parse_hostport
from tests.integration import procs
from tests.integration.procs import ServerProc as Server
from tests.integration.procs import tapproof
from tests.pkifix import host_creds, make_ca

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("srv") / "data"
    with procs.server(d) as srv:
        yield srv


def _metric(srv: Server, name: str, **labels: str) -> float:
    """The value of one sample on the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(_metrics(srv)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _log_since(srv: Server, offset: int) -> str:
    """What the server logged after ``offset`` characters (the module shares one server)."""
    return srv.log()[offset:]


def _metrics(srv: Server) -> str:
    with urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_new_user_flow(server: Server, tmp_path: Path) -> None:
    join = server.token("web-1")
    assert "\n" not in join
    assert join.startswith("tpj1.")
    js = parse(join)
    assert len(js.fingerprint) == 64
    assert js.fingerprint == js.fingerprint.lower()
    a = tmp_path / "agent"
    res = tapproof("agent", "enroll", "--data-dir", str(a), "--join", join)
    assert res.returncode == 0, res.stderr
    assert "spiffe://example.org/host/web-1" in res.stdout
    p = AgentPaths(a)
    assert stat.S_IMODE(os.stat(p.key).st_mode) == 0o600
    leaf = x509.load_pem_x509_certificates(p.cert.read_bytes())[0]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(minutes=59) < life - dt.timedelta(minutes=5) <= dt.timedelta(hours=1)
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/host/web-1"]
    assert "enrolled" in server.log()


def test_join_string_from_a_file_stdin_or_the_environment(server: Server, tmp_path: Path) -> None:
    """--join-file PATH, --join-file - and $TAPPROOF_JOIN enroll like --join, and keep the secret out of ``ps``."""
    f = tmp_path / "join"
    f.write_text(server.token("from-file") + "\n")
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "f"), "--join-file", str(f))
    assert res.returncode == 0, res.stderr
    assert "host/from-file" in res.stdout
    res = tapproof(
        "agent", "enroll", "--data-dir", str(tmp_path / "s"), "--join-file", "-", input=server.token("from-stdin")
    )
    assert res.returncode == 0, res.stderr
    assert "host/from-stdin" in res.stdout
    env = {**os.environ, "TAPPROOF_JOIN": server.token("from-env")}
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "e"), env=env)
    assert res.returncode == 0, res.stderr
    assert "host/from-env" in res.stdout


def test_agent_run_reads_the_join_file_only_when_not_enrolled(server: Server, tmp_path: Path) -> None:
    f = tmp_path / "join"
    f.write_text(server.token("run-file"))
    a = procs.start_agent(tmp_path / "a", None, "--join-file", str(f))
    try:
        assert a.status()["spiffe_id"].endswith("/host/run-file")
    finally:
        assert a.stop() == 0
    f.unlink()  # a Secret removed after enrollment: the next start must not care
    a = procs.start_agent(tmp_path / "a", None, "--join-file", str(f))
    try:
        assert a.events("join-ignored")
    finally:
        assert a.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--join-file", "{missing}"], "cannot read"),
        (["--join-file", "{empty}"], "empty join string"),
        (["--join-file", "{two}"], "several words"),
        ([], "give the join string"),
        (["--join", "x", "--join-file", "{empty}"], "not allowed with argument"),
    ],
)
def test_join_string_errors_change_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "two").write_text("tpj1.a tpj1.b\n")
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "two": str(tmp_path / "two")}
    env = {k: v for k, v in os.environ.items() if k != "TAPPROOF_JOIN"}
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), *[a.format(**paths) for a in args], env=env)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert not (tmp_path / "a").exists()


def test_token_create_prints_only_the_join_string(server: Server) -> None:
    res = tapproof("server", "token", "create", "--data-dir", str(server.data_dir), "--host", "only-one")
    assert res.returncode == 0
    assert len(res.stdout.splitlines()) == 1
    parse(res.stdout.strip())


def test_reused_token_refused_and_nothing_written(server: Server, tmp_path: Path) -> None:
    join = server.token("web-2")
    before = _metric(server, "tapproof_server_enrollments_refused_total", reason="used-token")
    assert tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", join).returncode == 0
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "b"), "--join", join)
    assert res.returncode == 1
    assert "used-token" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    assert _metric(server, "tapproof_server_enrollments_refused_total", reason="used-token") == before + 1


def test_concurrent_redemption_exactly_one(server: Server, tmp_path: Path) -> None:
    join = server.token("race")
    results: list[object] = []
    winners: list[bytes] = []  # the key of every certificate handed out
    retried: list[str] = []  # attempts that got no answer, repeated with the same pending key
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            creds = procs.retry_unanswered(lambda: enroll(tmp_path / f"a{i}", join), retried)
            r: object = "ok"
            with lock:
                winners.append(creds.leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
        except TapproofError as exc:
            r = exc
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 20
    assert results.count("ok") == 1
    assert len(set(winners)) == 1
    refused = [r for r in results if r != "ok"]
    assert all(isinstance(r, APIError) and r.code == "used-token" for r in refused), refused
    assert sum(1 for i in range(20) if AgentPaths(tmp_path / f"a{i}").enrolled()) == 1
    for i in range(20):  # a refused agent's dir holds nothing (a retry may leave it empty)
        d = tmp_path / f"a{i}"
        assert AgentPaths(d).enrolled() or not d.exists() or not any(d.iterdir()), sorted(d.iterdir())


@pytest.mark.slow
def test_expired_token_refused(server: Server, tmp_path: Path) -> None:
    join = server.token("late", ttl="10s")
    time.sleep(10.5)
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", join)
    assert res.returncode == 1
    assert "expired-token" in res.stderr
    assert not (tmp_path / "a").exists()


def test_tampered_join_string(server: Server, tmp_path: Path) -> None:
    join = server.token("tamper")
    bad = join[:20] + ("x" if join[20] != "x" else "y") + join[21:]
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", bad)
    assert res.returncode == 2
    assert "corrupted" in res.stderr
    assert not (tmp_path / "a").exists()
    for garbage in ("", "tpj1", "hello world", "tpj9.a.b"):
        res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", garbage)
        assert res.returncode == 2
        assert res.stderr.startswith("tapproof: error: --join")


def test_fingerprint_mismatch_sends_nothing(server: Server, tmp_path: Path) -> None:
    js = parse(server.token("pinned"))
    wrong = JoinString(js.servers, js.trust_domain, "0" * 64, js.secret).encode()
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", wrong)
    assert res.returncode == 1
    assert "fingerprint" in res.stderr
    assert not (tmp_path / "a").exists()
    # the secret never left: the genuine join string still works
    enroll(tmp_path / "b", js.encode())


def test_wrong_trust_domain_in_join_string(server: Server, tmp_path: Path) -> None:
    js = parse(server.token("td"))
    wrong = JoinString(js.servers, "other.org", js.fingerprint, js.secret).encode()
    res = tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", wrong)
    assert res.returncode == 1
    assert "trust domain" in res.stderr or "wrong-trust-domain" in res.stderr
    assert not (tmp_path / "a").exists()


def test_csr_for_another_identity_refused(server: Server) -> None:
    js = parse(server.token("honest"))
    from tapproof import identity

    key = keys.generate()
    bad = csr.build(key, identity.host_id("example.org", "admin-box")).decode()
    with pytest.raises(APIError) as ei:
        enroll_pinned(js.servers, js.trust_domain, js.fingerprint, {"token": js.secret, "csr": bad}, key)
    assert ei.value.status == 400
    assert ei.value.code == "csr-identity-mismatch"
    assert "csr-identity-mismatch" in server.log()


def test_renewal_and_revocation(server: Server, tmp_path: Path) -> None:
    a = tmp_path / "a"
    first = enroll(a, server.token("renewer"))
    paths = AgentPaths(a)
    second = renew(paths, dt.datetime.now(dt.UTC))
    assert second.spiffe_id == first.spiffe_id
    assert second.leaf.serial_number != first.leaf.serial_number
    assert second.key.public_key() != first.key.public_key()
    res = tapproof("server", "revoke", "--data-dir", str(server.data_dir), "--host", "renewer", "--reason", "test")
    assert res.returncode == 0, res.stderr
    before = paths.cert.read_bytes()
    with pytest.raises((APIError, TransportError, PeerRejected)):
        renew(paths, dt.datetime.now(dt.UTC))
    assert paths.cert.read_bytes() == before  # a failed renewal changes nothing
    assert "revoke-host" in tapproof("server", "audit-log", "--data-dir", str(server.data_dir)).stdout


def test_host_cannot_call_admin_routes(server: Server, tmp_path: Path) -> None:
    enroll(tmp_path / "a", server.token("nosy"))
    client = client_for(AgentPaths(tmp_path / "a"))
    with pytest.raises(APIError) as ei:
        client.post("/v1/tokens", {"host": "evil"})
    assert ei.value.status == 403
    assert client.get("/v1/revocations")["serials"] is not None


def test_client_certificate_from_other_ca_refused(server: Server, tmp_path: Path) -> None:
    from tapproof.control.client import APIClient
    from tapproof.tls import context
    from tapproof.tls.credentials import TrustBundle

    other = make_ca(tmp_path / "other")
    stranger = host_creds(other, "intruder")
    enroll(tmp_path / "a", server.token("trusting"))
    bundle = TrustBundle.from_pem(AgentPaths(tmp_path / "a").bundle.read_bytes())
    client = APIClient([server.address], "example.org", lambda: context.client_context(stranger, bundle), timeout=5)
    offset = len(server.log())
    with pytest.raises(TapproofError):
        client.get("/v1/policy")
    procs.wait_for(lambda: "handshake-refused" in _log_since(server, offset), 5, "the refusal log line")


def test_plaintext_and_tls12_clients_refused(server: Server) -> None:
    host, port = parse_hostport(server.address)
    name = "tapproof_server_handshakes_failed_total"
    before = {r: _metric(server, name, reason=r) for r in ("not-tls", "not-tls13")}
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        assert b"HTTP/1.1 200" not in data  # a TLS alert or nothing, never an HTTP answer
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw)
    for r in ("not-tls", "not-tls13"):  # each refusal counted under its own reason
        procs.wait_for(lambda r=r: _metric(server, name, reason=r) == before[r] + 1, 5, f"{r} refusal counted")


def test_policy_and_status_cli(server: Server) -> None:
    d = str(server.data_dir)
    res = tapproof("server", "policy", "allow", "--data-dir", d, "--from", "host/web-*", "--to", "redis")
    assert res.returncode == 0, res.stderr
    rid = int(res.stdout.split()[1])
    pol = json.loads(tapproof("server", "policy", "list", "--data-dir", d, "--json").stdout)
    assert any(r["id"] == rid and r["source"] == "spiffe://example.org/host/web-*" for r in pol["rules"])
    bad = tapproof("server", "policy", "allow", "--data-dir", d, "--from", "spiffe://evil.org/x", "--to", "redis")
    assert bad.returncode == 2  # refused by the server as bad input (http 400): exit 2 like a local check
    assert "trust domain" in bad.stderr
    assert tapproof("server", "policy", "remove", "--data-dir", d, str(rid)).returncode == 0
    assert tapproof("server", "policy", "remove", "--data-dir", d, str(rid)).returncode == 1
    st = json.loads(tapproof("server", "status", "--data-dir", d, "--json").stdout)
    assert st["trust_domain"] == "example.org"
    assert st["hosts"]["total"] >= 1
    human = tapproof("server", "status", "--data-dir", d)
    assert "root CA expires" in human.stdout


def test_openapi_served_and_complete(server: Server, tmp_path: Path) -> None:
    enroll(tmp_path / "a", server.token("reader"))
    served = client_for(AgentPaths(tmp_path / "a")).get("/v1/openapi.json")
    repo = json.loads(resources.files("tapproof.control").joinpath("openapi.json").read_text())
    assert served == repo
    documented = {(m.upper(), p) for p, ops in repo["paths"].items() for m in ops}
    for method, pattern, auth, _h in api.ROUTES:
        path = pattern.pattern.strip("^$").replace("\\.", ".").replace(r"(\d{1,12})", "{id}")
        assert (method, path) in documented, (method, path)
        assert repo["paths"][path][method.lower()]["x-tapproof-auth"] == auth
        # every route needs a client certificate (public ones: a bootstrap certificate will do)
        assert repo["paths"][path][method.lower()]["security"] == [{"mutualTLS": []}], (method, path)


def test_init_refuses_to_overwrite(server: Server) -> None:
    before = (server.data_dir / "ca" / "root.crt").read_bytes()
    res = tapproof("server", "init", "--data-dir", str(server.data_dir), "--trust-domain", "example.org")
    assert res.returncode == 2
    assert "refusing to overwrite" in res.stderr
    assert (server.data_dir / "ca" / "root.crt").read_bytes() == before


def test_corrupt_data_dir_and_database(tmp_path: Path) -> None:
    d = tmp_path / "d"
    procs.init_server(d)
    (d / "ca" / "intermediate.crt").write_text("garbage")
    res = tapproof("server", "run", "--data-dir", str(d), "--metrics", "")
    assert res.returncode == 2
    assert "corrupt CA" in res.stderr
    e = tmp_path / "e"
    procs.init_server(e)
    (e / "tapproof.db").write_bytes(b"this is not a database" * 100)
    res = tapproof("server", "run", "--data-dir", str(e), "--metrics", "")
    assert res.returncode == 1
    assert res.stderr.startswith("tapproof: error:")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one clear error, no JSON log line before it
    assert "Traceback" not in res.stderr
    res = tapproof("server", "run", "--data-dir", str(tmp_path / "nothing"))
    assert res.returncode == 2
    assert "server init" in res.stderr
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "server.toml").write_text("this is = = not toml")
    res = tapproof("server", "run", "--data-dir", str(tmp_path / "f"))
    assert res.returncode == 2
    assert "server.toml" in res.stderr


def test_init_bad_input_leaves_nothing(tmp_path: Path) -> None:
    d = tmp_path / "x"
    res = tapproof("server", "init", "--data-dir", str(d), "--trust-domain", "Bad_Domain!")
    assert res.returncode == 2
    assert "--trust-domain" in res.stderr
    assert not d.exists()
    res = tapproof("server", "init", "--data-dir", str(d), "--trust-domain", "ok.org", "--db", "mysql://x")
    assert res.returncode == 2
    assert "--db" in res.stderr
    assert not d.exists()


def test_enrollment_refused_is_logged_and_counted(server: Server) -> None:
    js = parse(server.token("counted"))
    before = _metric(server, "tapproof_server_enrollments_refused_total", reason="unknown-token")
    key = keys.generate()
    body = {"token": "B" * 43, "csr": csr.build(key, None).decode()}
    with pytest.raises(APIError) as ei:
        enroll_pinned(js.servers, js.trust_domain, js.fingerprint, body, key)
    assert ei.value.code == "unknown-token"
    assert _metric(server, "tapproof_server_enrollments_refused_total", reason="unknown-token") == before + 1


def test_only_enrollment_and_bundle_are_public(server: Server, tmp_path: Path) -> None:
    from OpenSSL import SSL

    from tapproof.control import tlsctx
    from tapproof.control.client import APIClient
    from tapproof.tls import context
    from tapproof.tls.credentials import TrustBundle

    assert {p.pattern for m, p, auth, _h in api.ROUTES if auth == "public"} == {r"^/v1/enroll$", r"^/v1/bundle$"}
    enroll(tmp_path / "a", server.token("bundle-reader"))
    bundle = TrustBundle.from_pem(AgentPaths(tmp_path / "a").bundle.read_bytes())
    anonymous = APIClient([server.address], "example.org", lambda: context.client_context(None, bundle), timeout=5)
    before = _metric(server, "tapproof_server_handshakes_failed_total", reason="no-certificate")
    with pytest.raises((TransportError, PeerRejected)):  # no client certificate: the handshake fails
        anonymous.get("/v1/bundle")
    procs.wait_for(
        lambda: _metric(server, "tapproof_server_handshakes_failed_total", reason="no-certificate") == before + 1,
        10,
        "the no-certificate refusal counted",
    )

    def bootstrap_ctx() -> SSL.Context:  # a self-signed certificate, as an enrolling agent presents
        ctx = context.client_context(None, bundle)
        key = keys.generate()
        ctx.use_certificate(tlsctx.bootstrap_certificate(key))
        ctx.use_privatekey(key)
        return ctx

    bootstrap = APIClient([server.address], "example.org", bootstrap_ctx, timeout=5)
    assert "BEGIN CERTIFICATE" in bootstrap.get("/v1/bundle")["bundle"]
    for path in ("/v1/healthz", "/v1/openapi.json", "/v1/policy", "/v1/status"):
        with pytest.raises(APIError) as ei:
            bootstrap.get(path)
        assert ei.value.status == 403
        assert ei.value.code == "bootstrap-certificate"


def test_keepalive_connection_is_cut_after_revocation(server: Server, tmp_path: Path) -> None:
    """The peer is re-checked before every request, not only at the handshake."""
    import h11

    from tapproof.agent.state import load_bundle, load_credentials
    from tapproof.tls import context
    from tapproof.tls.stream import connect

    paths = AgentPaths(tmp_path / "a")
    enroll(paths.root, server.token("keepalive"))
    ctx = context.client_context(load_credentials(paths), load_bundle(paths))
    stream = connect(parse_hostport(server.address), ctx, timeout=5)
    h = h11.Connection(h11.CLIENT)

    def get() -> int | None:
        deadline = time.monotonic() + 5
        stream.sendall(h.send(h11.Request(method="GET", target="/v1/revocations", headers=[("Host", "x")])), deadline)
        stream.sendall(h.send(h11.EndOfMessage()), deadline)
        status = None
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                try:
                    h.receive_data(stream.recv(65536, deadline))
                except TransportError:
                    return None
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
            if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                return status

    try:
        assert get() == 200
        h.start_next_cycle()
        offset = len(server.log())
        res = tapproof("server", "revoke", "--data-dir", str(server.data_dir), "--host", "keepalive")
        assert res.returncode == 0, res.stderr
        time.sleep(2.5)  # past the server's 2 s revocation cache
        assert get() is None  # the same connection is refused before the request runs
        assert "peer-refused-mid-connection" in _log_since(server, offset)
    finally:
        stream.abort()


def test_enrollment_bound_to_the_tls_key(server: Server, tmp_path: Path) -> None:
    """The CSR must be for the key of the bootstrap certificate the client presented: a token
    cannot be redeemed for a key the TLS client does not hold, and such a try spends nothing."""
    js = parse(server.token("bound"))
    before = _metric(server, "tapproof_server_enrollments_refused_total", reason="csr-key-mismatch")
    body = {"token": js.secret, "csr": csr.build(keys.generate(), None).decode()}
    with pytest.raises(APIError) as ei:
        enroll_pinned(js.servers, js.trust_domain, js.fingerprint, body, keys.generate())  # another key in TLS
    assert ei.value.status == 400
    assert ei.value.code == "csr-key-mismatch"
    assert _metric(server, "tapproof_server_enrollments_refused_total", reason="csr-key-mismatch") == before + 1
    assert "csr-key-mismatch" in server.log()
    enroll(tmp_path / "a", js.encode())  # the token was not spent
