"""Documents -> token shards: exact content, order, meta, staleness, safety."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data.test_corpus import make_cfg

from fraglm.config import END, SPECIAL_TOKENS, from_dict
from fraglm.data import shards
from fraglm.data.corpus import split_documents
from fraglm.data.shards import (
    ensure_tokenized,
    is_up_to_date,
    load_run_tokenizer,
    load_tokens,
    read_meta,
    tokenize,
)
from fraglm.data.tokenizer import decode, vocab_size
from fraglm.errors import FraglmError

MEDQUAD = Path(__file__).parents[2] / "../shared/data/medquad/medquad.jsonl"


def shard_text(out, split):
    return decode(load_run_tokenizer(out), load_tokens(out, split).tolist())


def shard_documents(out, split):
    """The documents in a shard, in order (every document ends with <|END|>)."""
    text = shard_text(out, split)
    assert text == "" or text.endswith(END)
    return [piece + END for piece in text.split(END)[:-1]]


def expected_split(documents, cfg):
    train, val = split_documents(len(documents), cfg.data.val_fraction, cfg.data.split_seed)
    return [documents[i] for i in train], [documents[i] for i in val]


def dir_snapshot(root):
    return {p.name: p.read_bytes() for p in sorted(Path(root).iterdir())}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, qa_records, write_jsonl):
    """The Q&A corpus tokenized once for this module (read-only for tests)."""
    root = tmp_path_factory.mktemp("tokenized")
    corpus = write_jsonl(root / "corpus.jsonl", qa_records)
    cfg = make_cfg(corpus, root / "out", val_fraction=0.2)
    summary = tokenize(cfg, progress=False)
    return cfg, summary


# shards hold exactly the templated corpus


def test_shards_decode_to_the_templated_corpus(tokenized, qa_documents):
    cfg, _ = tokenized
    train_docs, val_docs = expected_split(qa_documents, cfg)
    assert shard_text(cfg.data.tokenized_dir, "train") == "".join(train_docs)
    assert shard_text(cfg.data.tokenized_dir, "val") == "".join(val_docs)


def test_train_and_val_partition_the_documents_in_corpus_order(tokenized, qa_documents):
    cfg, _ = tokenized
    train = shard_documents(cfg.data.tokenized_dir, "train")
    val = shard_documents(cfg.data.tokenized_dir, "val")
    assert len(val) == round(0.2 * len(qa_documents))
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(qa_documents)
    position = {doc: i for i, doc in enumerate(qa_documents)}
    for part in (train, val):
        assert [position[d] for d in part] == sorted(position[d] for d in part)


def test_each_document_is_encoded_on_its_own(tokenized, qa_documents):
    # Shards are the concatenation of per-document encodings: ids never merge across <|END|>.
    cfg, _ = tokenized
    tok = load_run_tokenizer(cfg.data.tokenized_dir)
    train_docs, _ = expected_split(qa_documents, cfg)
    expected = [i for doc in train_docs for i in tok.encode(doc).ids]
    assert load_tokens(cfg.data.tokenized_dir, "train").tolist() == expected


def test_meta_json_describes_the_shards(tokenized, qa_documents):
    cfg, summary = tokenized
    root = Path(cfg.data.tokenized_dir)
    meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    tok = load_run_tokenizer(root)
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == vocab_size(tok) <= 400
    for split in ("train", "val"):
        assert (root / f"{split}.bin").stat().st_size == meta["tokens"][split] * 2
        assert len(load_tokens(root, split)) == meta["tokens"][split]
        assert load_tokens(root, split).dtype == np.uint16
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(qa_documents)
    assert meta["documents"]["val"] == round(0.2 * len(qa_documents))
    assert meta["characters"] == sum(len(d) for d in qa_documents) == summary.characters
    assert meta["split_seed"] == cfg.data.split_seed and meta["val_fraction"] == 0.2
    assert meta["corpus"] == cfg.data.path
    assert summary.train_tokens == meta["tokens"]["train"]
    assert summary.val_tokens == meta["tokens"]["val"]
    assert summary.documents == len(qa_documents)


def test_token_ids_fit_the_vocabulary(tokenized):
    cfg, _ = tokenized
    meta = read_meta(cfg.data.tokenized_dir)
    for split in ("train", "val"):
        assert int(load_tokens(cfg.data.tokenized_dir, split).max()) < meta["vocab_size"]


def test_token_dtype_widens_only_past_uint16():
    assert shards._token_dtype(400) == np.uint16
    assert shards._token_dtype(65536) == np.uint16
    assert shards._token_dtype(65537) == np.uint32


def test_many_documents_encoded_in_parallel_keep_their_order(tmp_path, write_jsonl):
    # >= 512 documents, so encoding really runs in 2 processes
    records = [{"question": f"Q{i} é?", "answer": f"answer {i} 🙂"} for i in range(600)]
    corpus = write_jsonl(tmp_path / "many.jsonl", records)
    cfg = make_cfg(corpus, tmp_path / "out", vocab_size=300, num_proc=2)
    tokenize(cfg, progress=False)
    documents = [f"<|Q|>{r['question']}<|A|>{r['answer']}<|END|>" for r in records]
    train_docs, val_docs = expected_split(documents, cfg)
    assert shard_text(cfg.data.tokenized_dir, "train") == "".join(train_docs)
    assert shard_text(cfg.data.tokenized_dir, "val") == "".join(val_docs)


def test_same_seed_same_outputs_and_other_seed_other_split(tmp_path, qa_jsonl):
    outs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = make_cfg(qa_jsonl, tmp_path / name, split_seed=seed, val_fraction=0.2)
        tokenize(cfg, progress=False)
        outs[name] = cfg.data.tokenized_dir
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (Path(outs["a"]) / f).read_bytes() == (Path(outs["b"]) / f).read_bytes()
    assert shard_documents(outs["a"], "val") != shard_documents(outs["c"], "val")


def test_val_fraction_zero_gives_an_empty_val_shard(tmp_path, qa_jsonl, qa_documents):
    cfg = make_cfg(qa_jsonl, tmp_path / "out", val_fraction=0)
    tokenize(cfg, progress=False)
    assert len(load_tokens(cfg.data.tokenized_dir, "val")) == 0
    assert shard_text(cfg.data.tokenized_dir, "train") == "".join(qa_documents)


def test_special_token_text_inside_a_record_stays_a_special_token(tmp_path, write_jsonl):
    # Documented behaviour: special tokens are recognised wherever they appear.
    records = [{"question": "What does <|END|> mean?", "answer": "A marker."}] * 4
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    cfg = make_cfg(corpus, tmp_path / "out", val_fraction=0, vocab_size=300)
    tokenize(cfg, progress=False)
    tok = load_run_tokenizer(cfg.data.tokenized_dir)
    ids = load_tokens(cfg.data.tokenized_dir, "train").tolist()
    assert ids.count(tok.token_to_id(END)) == 8
    assert shard_text(cfg.data.tokenized_dir, "train") == (
        "<|Q|>What does <|END|> mean?<|A|>A marker.<|END|>" * 4
    )
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)


# staleness: re-run exactly when the corpus or the settings change


def test_ensure_tokenized_runs_once_then_reuses(tmp_path, qa_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    assert not is_up_to_date(cfg)
    assert ensure_tokenized(cfg, progress=False) is not None
    assert is_up_to_date(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in Path(cfg.data.tokenized_dir).iterdir()}
    assert ensure_tokenized(cfg, progress=False) is None
    after = {p.name: p.stat().st_mtime_ns for p in Path(cfg.data.tokenized_dir).iterdir()}
    assert before == after


def test_changed_settings_make_shards_stale(tokenized):
    cfg, _ = tokenized
    assert is_up_to_date(cfg)
    raw = cfg.to_dict()
    raw["tokenizer"]["vocab_size"] = 401
    assert not is_up_to_date(from_dict(raw))


def test_changed_corpus_triggers_a_rerun(tmp_path, qa_jsonl, qa_records, write_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    tokenize(cfg, progress=False)
    write_jsonl(qa_jsonl, [*qa_records, {"question": "New?", "answer": "Yes, new."}])
    assert not is_up_to_date(cfg)
    summary = ensure_tokenized(cfg, progress=False)
    assert summary is not None and summary.documents == len(qa_records) + 1
    assert is_up_to_date(cfg)
    text = shard_text(cfg.data.tokenized_dir, "train") + shard_text(cfg.data.tokenized_dir, "val")
    assert "<|Q|>New?<|A|>Yes, new.<|END|>" in text


@pytest.mark.parametrize("damage", ["delete val.bin", "delete tokenizer.json", "corrupt meta"])
def test_damaged_output_is_not_up_to_date(tmp_path, qa_jsonl, damage):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    tokenize(cfg, progress=False)
    root = Path(cfg.data.tokenized_dir)
    if damage == "corrupt meta":
        (root / "meta.json").write_text("{not json", encoding="utf-8")
    else:
        (root / damage.split()[1]).unlink()
    assert not is_up_to_date(cfg)
    assert ensure_tokenized(cfg, progress=False) is not None
    assert is_up_to_date(cfg)


def test_truncated_shard_is_reported(tmp_path, qa_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    tokenize(cfg, progress=False)
    train_bin = Path(cfg.data.tokenized_dir) / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-1])
    with pytest.raises(FraglmError, match="truncated or corrupt"):
        load_tokens(cfg.data.tokenized_dir, "train")


def test_load_tokens_without_tokenized_data(tmp_path):
    with pytest.raises(FraglmError, match="fraglm tokenize"):
        load_tokens(tmp_path, "train")


# a failed run never damages a previous result


def test_bad_field_leaves_previous_output_intact(tmp_path, qa_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    tokenize(cfg, progress=False)
    before = dir_snapshot(cfg.data.tokenized_dir)
    bad = make_cfg(qa_jsonl, tmp_path / "out", answer_field="reply")
    with pytest.raises(FraglmError, match="no field 'reply'"):
        tokenize(bad, progress=False)
    assert dir_snapshot(cfg.data.tokenized_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out"]
    assert is_up_to_date(cfg)


@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_previous_output_intact(tmp_path, qa_jsonl, monkeypatch, exc):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    tokenize(cfg, progress=False)
    before = dir_snapshot(cfg.data.tokenized_dir)
    write_tokens = shards._write_tokens

    def fail_on_val(path, pieces, dtype):
        if path.name == "val.bin":
            raise exc
        return write_tokens(path, pieces, dtype)

    monkeypatch.setattr(shards, "_write_tokens", fail_on_val)
    other = make_cfg(qa_jsonl, tmp_path / "out", vocab_size=300)
    with pytest.raises(type(exc)):
        tokenize(other, progress=False)
    assert dir_snapshot(cfg.data.tokenized_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out"]


def test_rerun_replaces_output_completely(tmp_path, qa_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    tokenize(cfg, progress=False)
    stray = Path(cfg.data.tokenized_dir) / "stray.txt"
    stray.write_text("left from elsewhere", encoding="utf-8")
    tokenize(make_cfg(qa_jsonl, tmp_path / "out", vocab_size=300), progress=False)
    assert not stray.exists()
    assert read_meta(cfg.data.tokenized_dir)["vocab_size"] <= 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out"]


# real corpora


@pytest.mark.skipif(not MEDQUAD.is_file(), reason="MedQuAD copy not on this machine")
def test_medquad_slice_round_trips(tmp_path):
    records = []
    with MEDQUAD.open(encoding="utf-8") as fh:
        for line in fh:
            records.append(json.loads(line))
            if len(records) == 300:
                break
    documents = [f"<|Q|>{r['question']}<|A|>{r['answer']}<|END|>" for r in records]
    cfg = make_cfg(MEDQUAD.resolve(), tmp_path / "out", vocab_size=600, max_records=300)
    summary = tokenize(cfg, progress=False)
    assert summary.documents == 300
    train_docs, val_docs = expected_split(documents, cfg)
    assert shard_text(cfg.data.tokenized_dir, "train") == "".join(train_docs)
    assert shard_text(cfg.data.tokenized_dir, "val") == "".join(val_docs)
    assert summary.chars_per_token > 1.5  # BPE merges did something on real text


def test_copy_of_tokenized_dir_is_self_contained(tokenized, tmp_path, qa_documents):
    cfg, _ = tokenized
    moved = tmp_path / "moved"
    shutil.copytree(cfg.data.tokenized_dir, moved)
    train_docs, _ = expected_split(qa_documents, cfg)
    assert shard_text(moved, "train") == "".join(train_docs)
