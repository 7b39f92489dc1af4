"""The tokenizer: exact round trip of any text, streaming decode, special tokens, file format."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from fraglm.config import SPECIAL_TOKENS, TokenizerConfig
from fraglm.data.tokenizer import (
    MIN_VOCAB_SIZE,
    decode,
    decode_stream,
    load_tokenizer,
    special_ids,
    train_tokenizer,
    vocab_size,
)
from fraglm.errors import FraglmError

ROUND_TRIP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Text with the special tokens glued anywhere into arbitrary Unicode.
TEXT_WITH_SPECIALS = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TOKENS)), max_size=8
).map("".join)
NO_SPECIALS = st.text(max_size=20).filter(lambda s: not any(t in s for t in SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def tok(qa_documents) -> Tokenizer:
    return train_tokenizer(qa_documents, TokenizerConfig(vocab_size=400), progress=False)


@pytest.fixture(scope="module")
def tokenizer_file(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@ROUND_TRIP
@given(text=st.text())
def test_decode_inverts_encode_for_any_text(tok, text):
    assert decode(tok, tok.encode(text).ids) == text


@ROUND_TRIP
@given(text=TEXT_WITH_SPECIALS)
def test_round_trip_with_special_tokens_inside(tok, text):
    assert decode(tok, tok.encode(text).ids) == text


@ROUND_TRIP
@given(text=st.one_of(st.text(), TEXT_WITH_SPECIALS))
def test_decode_stream_pieces_concatenate_to_the_text(tok, text):
    ids = tok.encode(text).ids
    pieces = list(decode_stream(tok, ids))
    assert "".join(pieces) == text
    assert all(pieces), "no empty pieces"
    if "\ufffd" not in text:
        # a multi-byte character is held back until complete, never shown half-done
        assert not any("\ufffd" in p for p in pieces)


def test_decode_stream_holds_back_a_split_character(tok):
    # One character, several byte tokens: nothing may appear until its last byte arrives.
    text = "\U0001fae0"  # not in the training corpus, so it encodes as 4 byte tokens
    ids = tok.encode(text).ids
    assert len(ids) > 1
    assert list(decode_stream(tok, ids[:-1])) == []
    assert list(decode_stream(tok, ids)) == [text]


def test_corpus_documents_round_trip(tok, qa_documents):
    for doc in qa_documents:
        assert decode(tok, tok.encode(doc).ids) == doc
        assert "".join(decode_stream(tok, tok.encode(doc).ids)) == doc


def test_special_tokens_are_distinct_ids_in_the_vocabulary(tok):
    ids = special_ids(tok)
    assert list(ids) == list(SPECIAL_TOKENS)
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert all(0 <= i < vocab_size(tok) for i in ids.values())


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
@pytest.mark.parametrize(
    ("before", "after"),
    [("", ""), ("abc", "def"), (" ", " "), ("é", "糖"), ("\n", "\n"), ("<|", "|>"), ("x", "")],
)
def test_special_token_is_one_id_even_when_glued(tok, token, before, after):
    token_id = tok.token_to_id(token)
    ids = tok.encode(before + token + after).ids
    assert ids.count(token_id) == 1
    assert ids == [*tok.encode(before).ids, token_id, *tok.encode(after).ids]
    assert decode(tok, ids) == before + token + after


@ROUND_TRIP
@given(before=NO_SPECIALS, after=NO_SPECIALS, token=st.sampled_from(SPECIAL_TOKENS))
def test_special_token_splits_any_text_cleanly(tok, before, after, token):
    ids = tok.encode(before + token + after).ids
    assert ids == [*tok.encode(before).ids, tok.token_to_id(token), *tok.encode(after).ids]


def test_template_document_starts_and_ends_with_special_ids(tok):
    ids = tok.encode("<|Q|>How much water?<|A|>About 2 litres.<|END|>").ids
    sp = special_ids(tok)
    assert ids[0] == sp["<|Q|>"] and ids[-1] == sp["<|END|>"]
    assert ids.count(sp["<|A|>"]) == 1


def test_special_token_text_is_not_split_by_merges(tok):
    # Each special token, repeated, stays one id per occurrence.
    for token in SPECIAL_TOKENS:
        assert tok.encode(token * 3).ids == [tok.token_to_id(token)] * 3


def test_vocab_size_is_respected(tok, qa_documents):
    assert MIN_VOCAB_SIZE < vocab_size(tok) <= 400


def test_smallest_vocab_still_round_trips(qa_documents):
    tiny = train_tokenizer(qa_documents, TokenizerConfig(vocab_size=MIN_VOCAB_SIZE), progress=False)
    assert vocab_size(tiny) == MIN_VOCAB_SIZE == 260
    text = qa_documents[9] + "\x00\U0010ffff"
    assert decode(tiny, tiny.encode(text).ids) == text


def test_vocab_too_small_for_bytes_and_specials(qa_documents):
    with pytest.raises(FraglmError, match=r"vocab_size = 259 is too small.*at least 260"):
        train_tokenizer(qa_documents, TokenizerConfig(vocab_size=259), progress=False)


def test_training_is_deterministic(qa_documents, tok):
    again = train_tokenizer(qa_documents, TokenizerConfig(vocab_size=400), progress=False)
    assert again.to_str() == tok.to_str()


# tokenizer.json as a file other tools read


SAMPLES = [
    "<|Q|>Is 37.5 °C a fever?<|A|>Slightly raised; rest and drink water.<|END|>",
    "  leading spaces, trailing  ",
    "糖尿病 🙂 Ελληνικά\nnew line\ttab",
    "",
]


def test_file_loads_with_tokenizers_and_gives_same_ids(tok, tokenizer_file):
    loaded = Tokenizer.from_file(str(tokenizer_file))
    for text in SAMPLES:
        assert loaded.encode(text).ids == tok.encode(text).ids
        assert decode(loaded, loaded.encode(text).ids) == text


def test_load_tokenizer_reads_a_saved_file(tok, tokenizer_file):
    loaded = load_tokenizer(tokenizer_file)
    assert special_ids(loaded) == special_ids(tok)
    assert loaded.encode(SAMPLES[0]).ids == tok.encode(SAMPLES[0]).ids


def test_file_loads_with_transformers_and_gives_same_ids(tok, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    for text in SAMPLES:
        ids = tok.encode(text).ids
        assert fast.encode(text, add_special_tokens=False) == ids
        assert fast(text)["input_ids"] == ids
        assert fast.decode(ids, clean_up_tokenization_spaces=False) == text
    for token in SPECIAL_TOKENS:
        assert fast.convert_tokens_to_ids(token) == tok.token_to_id(token)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(FraglmError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_load_tokenizer_corrupt_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(FraglmError, match="corrupt"):
        load_tokenizer(path)


def test_load_tokenizer_without_special_tokens(tmp_path):
    from tokenizers import models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    plain.train_from_iterator(["hello world"] * 10, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    plain.save(str(path))
    with pytest.raises(FraglmError, match=r"lacks the special tokens <\|pad\|>"):
        load_tokenizer(path)
