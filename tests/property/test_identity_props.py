"""Property tests: any string either parses to an ID that prints back identically, or is refused."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from tapproof import identity
from tapproof.identity import InvalidSpiffeID

segment = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", fullmatch=True).filter(lambda s: s not in (".", ".."))
td = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,15}", fullmatch=True)


@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused(text: str) -> None:
    try:
        sid = identity.parse(text)
    except InvalidSpiffeID:
        return
    assert str(sid) == text  # never normalised


@given(td, st.lists(segment, min_size=1, max_size=5))
def test_valid_ids_round_trip(domain: str, segs: list[str]) -> None:
    text = f"spiffe://{domain}/" + "/".join(segs)
    assert str(identity.parse(text)) == text


@given(st.text(alphabet="spiffe:/.%abcAB-_?#@", max_size=60))
def test_near_miss_alphabet(text: str) -> None:
    text = "spiffe://" + text  # past the scheme check, into the trust domain and path rules
    with contextlib.suppress(InvalidSpiffeID):
        assert str(identity.parse(text)) == text  # parsed exactly, never normalised
