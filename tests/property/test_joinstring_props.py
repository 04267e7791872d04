"""Property tests: random and mutated join strings are refused with JoinStringError, never a crash."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tapproof.control.joinstring import JoinString, new_secret, parse
from tapproof.errors import JoinStringError

VALID = JoinString(("127.0.0.1:7443",), "example.org", "cd" * 32, new_secret()).encode()


@given(st.text(max_size=300))
def test_random_text_refused(text: str) -> None:
    try:
        parse(text)
    except JoinStringError:
        return
    raise AssertionError("random text parsed as a join string")


@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.characters(codec="ascii"))
def test_single_character_mutation_refused_or_identical(pos: int, ch: str) -> None:
    mutated = VALID[:pos] + ch + VALID[pos + 1 :]
    try:
        js = parse(mutated)
    except JoinStringError:
        return
    assert js.encode() == VALID  # only a no-op mutation (same char / whitespace trim) may parse


@given(st.integers(min_value=1, max_value=len(VALID) - 1))
def test_truncation_refused(n: int) -> None:
    try:
        parse(VALID[:n])
    except JoinStringError:
        return
    raise AssertionError("truncated join string parsed")


@given(st.text(max_size=200), st.text(alphabet="ABCDEFabcdef0123456789-_", min_size=8, max_size=8))
def test_prefixed_random_text_refused(payload: str, check: str) -> None:
    """Past the prefix: payload and checksum parsing must refuse, never crash."""
    try:
        parse(f"tpj1.{payload}.{check}")
    except JoinStringError:
        return
    raise AssertionError("random payload parsed as a join string")
