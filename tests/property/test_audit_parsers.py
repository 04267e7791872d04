"""Property tests: any bytes are classified or rejected with the parser's own error type."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapproof.audit import synth, tls
from tapproof.audit.capture import decode, read_packets
from tapproof.audit.classify import Classification, classify
from tapproof.audit.errors import AuditInputError, TLSParseError
from tapproof.audit.pipeline import analyze
from tapproof.audit.report import build_report
from tapproof.audit.verdict import grade

_CH = synth.client_hello()
_SH = synth.server_hello() + synth.app_data(100)
_SH12 = synth.server_hello(version=0x0303, cipher=0xC02F) + synth.server_key_exchange() + synth.server_hello_done()


def _mutate(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with a few bytes changed, cut short, or with bytes inserted."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(base)
        for _ in range(draw(st.integers(0, 6))):
            if not data:
                break
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        extra = draw(st.binary(max_size=20))
        return bytes(data[:cut]) + extra

    return build()


TLS_LIKE = st.one_of(st.binary(max_size=600), _mutate(_CH), _mutate(_SH), _mutate(_SH12))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(TLS_LIKE, TLS_LIKE)
def test_tls_parser_raises_only_its_own_error(client: bytes, server: bytes) -> None:
    try:
        info = tls.parse(client, server)
    except TLSParseError:
        return
    assert isinstance(info, tls.TLSInfo)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(TLS_LIKE, TLS_LIKE, st.booleans(), st.booleans(), st.integers(0, 65535))
def test_classifier_never_raises(client: bytes, server: bytes, final: bool, midstream: bool, port: int) -> None:
    cl = classify(client, server, port=port, final=final, midstream=midstream)
    assert isinstance(cl, Classification)
    v = grade(cl)
    assert v.grade in {"A", "B", "C", "D", "F", "?"}
    if final:
        assert cl.done or cl.protocol in ("tls", "ssh", "smtp", "ftp", "imap", "pop3", "postgresql", "mysql", "http")


@settings(max_examples=300)
@given(st.integers(0, 300), st.binary(max_size=80))
def test_decode_never_raises(linktype: int, frame: bytes) -> None:
    with contextlib.suppress(AuditInputError):
        decode(linktype, frame)


_REAL_FRAME = synth.frame("10.0.0.1", "10.0.0.2", 40000, 443, 1000, 5000, 0x18, synth.client_hello())


@settings(max_examples=300)
@given(st.integers(0, len(_REAL_FRAME) - 1), st.integers(0, 255), st.integers(0, len(_REAL_FRAME)))
def test_decode_mutated_real_frames(pos: int, value: int, cut: int) -> None:
    """Real Ethernet/IPv4/TCP frames with one byte changed and a truncation reach the TCP decoder."""
    frame = bytearray(_REAL_FRAME)
    frame[pos] = value
    with contextlib.suppress(AuditInputError):
        decode(1, bytes(frame[:cut]))


def _capture_bytes() -> bytes:
    with tempfile.TemporaryFile() as f:
        w = synth.PcapWriter(f)  # type: ignore[arg-type]
        for ts, fr in synth.conversation(("10.0.0.1", 5), ("10.0.0.2", 443), [("c", _CH), ("s", _SH)]):
            w.write(ts, fr)
        f.seek(0)
        return f.read()


_PCAP = _capture_bytes()


@settings(max_examples=150, deadline=None)
@given(_mutate(_PCAP))
def test_pcap_reader_on_mutated_files(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.pcap"
        p.write_bytes(data)
        with contextlib.suppress(AuditInputError):
            list(read_packets(str(p)))
        try:
            rep = build_report(analyze([str(p)]))
        except AuditInputError:
            return
        assert rep["summary"]["packets"] >= 0
