"""Incremental detokenization for every family's tokenizer: the streamed deltas add up to what the
tokenizer decodes at once, never split a character, and stop strings cut across token boundaries;
the fast path (tokenizers' DecodeStream) and the Python window path agree."""

from __future__ import annotations

import pytest
from family_harness import FAMILIES

from tritonvlm.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is a test.",
    " leading space and  double  spaces\nnew line\n\ttab",
    "ünïcödé, 中文字符, emoji 🎉🚀 and 👩‍👩‍👧 families",
    "numbers 1234567 and symbols <>{}[]()!?",
]


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizer(request, family_kit):
    return family_kit(request.param).tokenizer


def stream(tokenizer, ids: list[int], fast: bool, stop: list[str] | None = None) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    if not fast:
        detok._stream = None
    deltas = [detok.add_token(t) for t in ids]
    if not detok.stopped:
        deltas.append(detok.finish())
    return deltas, detok.text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode_on_both_paths(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    fast_deltas, _ = stream(tokenizer, ids, fast=True)
    slow_deltas, _ = stream(tokenizer, ids, fast=False)
    assert "".join(fast_deltas) == whole == "".join(slow_deltas)
    assert not any("\ufffd" in d for d in fast_deltas)  # no character split across deltas


def test_the_fast_path_is_taken_for_fast_tokenizers(tokenizer):
    assert (IncrementalDetokenizer(tokenizer)._stream is not None) == (
        tokenizer.is_fast and not tokenizer.clean_up_tokenization_spaces
    )


def test_an_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        pytest.skip("the emoji is one token here")
    cut = ids[:-1]
    deltas, _ = stream(tokenizer, cut, fast=True)
    assert "".join(deltas) == tokenizer.decode(cut, skip_special_tokens=True)


@pytest.mark.parametrize("fast", [True, False])
def test_stop_strings_cut_across_tokens(tokenizer, fast):
    text = "The answer is forty-two. STOP here and nothing after."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas, final = stream(tokenizer, ids, fast=fast, stop=["STOP"])
    assert "".join(deltas) == final == "The answer is forty-two. "


def test_random_tokens_never_break_the_stream(tokenizer):
    """A random model emits any token, bytes that are not UTF-8 included (tokenizers' DecodeStream
    raises on some): the detokenizer goes on (the window path takes over) and the text is what the
    window path alone makes of the same tokens."""
    import random

    rng = random.Random(7)
    vocab = len(tokenizer)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(40)]
        fast, _ = stream(tokenizer, ids, fast=True)
        slow, _ = stream(tokenizer, ids, fast=False)
        assert "".join(fast) == "".join(slow), ids
