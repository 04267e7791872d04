"""Join strings: encode/parse, and every malformed form refused with JoinStringError."""

from __future__ import annotations

import base64
import json

import pytest

from tapproof.control.joinstring import JoinString, hash_secret, new_secret, parse
from tapproof.errors import JoinStringError

FP = "ab" * 32


def good() -> JoinString:
    return JoinString(("127.0.0.1:7443", "[::1]:7443"), "example.org", FP, new_secret())


def test_round_trip() -> None:
    js = good()
    back = parse(js.encode())
    assert back == js
    assert back.token_hash == hash_secret(js.secret)


def test_secret_has_at_least_128_bits() -> None:
    s = new_secret()
    assert len(base64.urlsafe_b64decode(s + "=")) * 8 >= 128


def test_repr_hides_secret() -> None:
    js = good()
    assert js.secret not in repr(js)


def _forge(body: dict[str, object]) -> str:
    """A string with a VALID checksum around an invalid body (checks beyond the checksum)."""
    from tapproof.control import joinstring as j

    payload = j._b64(json.dumps(body).encode())
    return f"tpj1.{payload}.{j._check(payload)}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "tpj1.",
        "tpj1..",
        "tpj2.abc.def",
        "tpj1.abc.def.ghi",
        "tpj1.%%%.abc",
        "x" * 5000,
        "tpj1.ab\ufffdcd.AAAAAAAA",  # found by fuzz/targets.py join-string: was a UnicodeEncodeError
        "tpj1.abcd.\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(JoinStringError):
        parse(text)


def test_tampered_payload_fails_checksum() -> None:
    text = good().encode()
    prefix, payload, check = text.split(".")
    flipped = payload[:-3] + ("A" if payload[-3] != "A" else "B") + payload[-2:]
    with pytest.raises(JoinStringError, match="corrupted"):
        parse(f"{prefix}.{flipped}.{check}")


@pytest.mark.parametrize(
    "body",
    [
        {"s": [], "t": "example.org", "f": FP, "k": new_secret()},
        {"s": ["nohostport"], "t": "example.org", "f": FP, "k": new_secret()},
        {"s": ["127.0.0.1:7443"], "t": "EXAMPLE.org", "f": FP, "k": new_secret()},
        {"s": ["127.0.0.1:7443"], "t": "example.org", "f": "AB" * 32, "k": new_secret()},
        {"s": ["127.0.0.1:7443"], "t": "example.org", "f": FP[:-1], "k": new_secret()},
        {"s": ["127.0.0.1:7443"], "t": "example.org", "f": FP, "k": "short"},
        {"s": ["127.0.0.1:7443"], "t": "example.org", "f": FP, "k": new_secret(), "x": 1},
        {"s": "127.0.0.1:7443", "t": "example.org", "f": FP, "k": new_secret()},
    ],
)
def test_invalid_fields_with_valid_checksum(body: dict[str, object]) -> None:
    with pytest.raises(JoinStringError):
        parse(_forge(body))
