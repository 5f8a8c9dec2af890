"""Incremental detokenization against the tokenizer's own full decode (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from warmserve.gateway.text import IncrementalText


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


# Ids from the whole vocabulary (byte pieces that split UTF-8 characters included), cut into
# chunks the way engine steps deliver them.
ids_st = st.lists(st.integers(0, 49151), min_size=1, max_size=60)
cuts_st = st.lists(st.integers(1, 4), min_size=1, max_size=60)


def feed(text: IncrementalText, ids: list[int], cuts: list[int]) -> str:
    out, i, k = [], 0, 0
    while i < len(ids) and not text.stopped:
        n = cuts[k % len(cuts)]
        out.append(text.push(ids[i : i + n]))
        i, k = i + n, k + 1
    out.append(text.flush())
    return "".join(out)


@settings(max_examples=150, deadline=None)
@given(ids=ids_st, cuts=cuts_st)
def test_streamed_text_equals_the_full_decode(tok, ids, cuts):
    assert feed(IncrementalText(tok), ids, cuts) == tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=150, deadline=None)
@given(ids=ids_st, cuts=cuts_st, data=st.data())
def test_output_stops_right_before_the_first_stop_string(tok, ids, cuts, data):
    full = tok.decode(ids, skip_special_tokens=True)
    if len(full) < 2:
        return
    a = data.draw(st.integers(0, len(full) - 1))
    stop = full[a : a + data.draw(st.integers(1, 4))]
    text = IncrementalText(tok, [stop, "\x00never"])
    assert feed(text, ids, cuts) == full[: full.index(stop)]
    assert text.stopped


def test_cost_per_token_does_not_grow_with_the_output(tok):
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = IncrementalText(Counting())
    ids = tok.encode("word " * 600)
    for t in ids:
        text.push([t])
    assert max(calls) <= 8  # a short window, not the whole output
