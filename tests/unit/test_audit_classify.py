"""Protocol detection and grades, one protocol at a time, from hand-built bytes."""

from __future__ import annotations

import random

import pytest

from tapproof.audit import synth
from tapproof.audit.classify import classify, entropy
from tapproof.audit.verdict import grade, worst

PQ = synth.server_hello(group=0x11EC) + synth.app_data(64)


def _g(c: bytes, s: bytes, **kw: object) -> str:
    return grade(classify(c, s, **kw)).grade  # type: ignore[arg-type]


def test_grades_for_tls() -> None:
    ch = synth.client_hello()
    assert _g(ch, PQ) == "A"
    assert _g(ch, synth.server_hello(group=0x001D)) == "B"
    ecdhe = synth.server_hello(version=0x0303, cipher=0xC02F) + synth.server_key_exchange() + synth.server_hello_done()
    assert _g(ch, ecdhe) == "C"
    cbc = synth.server_hello(version=0x0303, cipher=0xC013) + synth.server_key_exchange() + synth.server_hello_done()
    assert _g(ch, cbc) == "D"
    rsa = synth.server_hello(version=0x0303, cipher=0x009C) + synth.server_hello_done()
    assert _g(ch, rsa) == "D"
    rc4 = synth.server_hello(version=0x0303, cipher=0x0005) + synth.server_hello_done()
    assert _g(ch, rc4) == "F"


def test_client_hello_alone_is_undetermined_until_final() -> None:
    cl = classify(synth.client_hello(), b"")
    assert not cl.done
    cl = classify(synth.client_hello(), b"", final=True)
    assert cl.done
    assert grade(cl).grade == "?"


def test_reversed_direction_is_swapped() -> None:
    cl = classify(PQ, synth.client_hello())
    assert cl.swap
    assert grade(cl).grade == "A"


@pytest.mark.parametrize(
    ("client", "server", "protocol"),
    [
        (b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\n", "http"),
        (b"", b"HTTP/1.0 404 Not Found\r\n\r\n", "http"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"", "http2"),
        (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", b"+OK\r\n", "redis"),
        (b"PING\r\n", b"+PONG\r\n", "redis"),
        (b"get foo\r\n", b"END\r\n", "memcached"),
        (b"set k 0 0 1\r\nv\r\n", b"STORED\r\n", "memcached"),
        (b"EHLO client\r\nMAIL FROM:<a@b>\r\n", b"220 mx ESMTP\r\n250 ok\r\n", "smtp"),
        (b"USER anonymous\r\n", b"220 ProFTPD Server\r\n", "ftp"),
        (b"a1 LOGIN u p\r\n", b"* OK IMAP4rev1 ready\r\n", "imap"),
        (b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00alice\x00database\x00app\x00\x00", b"R", "postgresql"),
        (b"", b"SSH-2.0-OpenSSH_9.2p1\r\n", "ssh"),
    ],
)
def test_plaintext_protocols(client: bytes, server: bytes, protocol: str) -> None:
    cl = classify(client, server, final=True)
    assert cl.protocol == protocol
    assert grade(cl).grade == ("D" if protocol == "ssh" else "F")


def test_dns_over_tcp() -> None:
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03org\x00\x00\x01\x00\x01"
    cl = classify(len(q).to_bytes(2, "big") + q, b"", port=53, final=True)
    assert cl.protocol == "dns-tcp"


def test_mysql_plain_and_ssl_upgrade() -> None:
    greeting = b"\x0a8.0.36\x00" + bytes(40)
    s = len(greeting).to_bytes(3, "little") + b"\x00" + greeting
    login = (0x0A8D).to_bytes(4, "little") + bytes(28)  # no CLIENT_SSL
    assert classify(len(login).to_bytes(3, "little") + b"\x01" + login, s).protocol == "mysql"
    sslreq = (0x0A8D | 0x0800).to_bytes(4, "little") + bytes(28)
    c = len(sslreq).to_bytes(3, "little") + b"\x01" + sslreq + synth.client_hello()
    cl = classify(c, s + PQ)
    assert cl.protocol == "tls"
    assert cl.upgraded_from == "mysql"
    assert grade(cl).grade == "A"


def test_postgres_sslrequest_upgrade_and_refusal() -> None:
    sslreq = bytes.fromhex("0000000804d2162f")
    cl = classify(sslreq + synth.client_hello(), b"S" + PQ)
    assert (cl.protocol, cl.upgraded_from, grade(cl).grade) == ("tls", "postgresql", "A")
    startup = b"\x00\x00\x00\x17\x00\x03\x00\x00user\x00bob\x00\x00"
    cl = classify(sslreq + startup, b"N", final=True)
    assert (cl.protocol, grade(cl).grade) == ("postgresql", "F")


def test_smtp_starttls_upgrade() -> None:
    c = b"EHLO me\r\nSTARTTLS\r\n" + synth.client_hello()
    s = b"220 mx ESMTP\r\n250-mx\r\n250 STARTTLS\r\n220 2.0.0 go ahead\r\n" + synth.server_hello(group=0x001D)
    cl = classify(c, s)
    assert (cl.protocol, cl.upgraded_from, grade(cl).grade) == ("tls", "smtp", "B")


def test_smtp_starttls_waits_for_the_handshake() -> None:
    cl = classify(b"EHLO me\r\nSTARTTLS\r\n", b"220 mx ESMTP\r\n")
    assert not cl.done


def test_http_connect_tunnel() -> None:
    c = b"CONNECT db:5432 HTTP/1.1\r\nHost: db\r\n\r\n" + synth.client_hello()
    s = b"HTTP/1.1 200 Connection established\r\n\r\n" + PQ
    cl = classify(c, s)
    assert (cl.protocol, cl.upgraded_from, grade(cl).grade) == ("tls", "http-connect", "A")


def test_ssh_kex_names_pq() -> None:
    def kexinit(names: bytes) -> bytes:
        body = b"\x14" + bytes(16) + len(names).to_bytes(4, "big") + names + bytes(40)
        pad = 4
        return (len(body) + 1 + pad).to_bytes(4, "big") + bytes([pad]) + body + bytes(pad)

    c = b"SSH-2.0-OpenSSH_9.9\r\n" + kexinit(b"mlkem768x25519-sha256,curve25519-sha256")
    s = b"SSH-2.0-OpenSSH_9.9\r\n" + kexinit(b"curve25519-sha256,mlkem768x25519-sha256")
    cl = classify(c, s)
    assert cl.ssh_kex == "mlkem768x25519-sha256"
    assert "post-quantum" in grade(cl).reason


def test_unknown_by_entropy_and_printability() -> None:
    rng = random.Random(1)
    noise = rng.randbytes(4096)
    assert classify(noise[:2048], noise[2048:], final=True).protocol == "unknown-encrypted"
    text = b"hello this is a custom text protocol line\n" * 60
    assert classify(text, b"", final=True).protocol == "unknown-plaintext"
    binary = bytes(range(16)) * 200
    assert classify(binary, b"", final=True).protocol == "unknown-plaintext"
    assert classify(b"\x01\x02", b"", final=True).protocol == "unknown"
    assert entropy(bytes(range(256))) == pytest.approx(8.0)


def test_midstream_tls_records() -> None:
    stream = synth.app_data(300) + synth.app_data(200)
    cl = classify(stream[7:], b"", midstream=True, final=True)
    assert cl.protocol == "tls"
    assert grade(cl).grade == "?"
    assert "before the capture" in grade(cl).reason


def test_worst() -> None:
    assert worst(["A", "?", "C"]) == "?"
    assert worst(["A", "F"]) == "F"
    assert worst([]) == "?"
