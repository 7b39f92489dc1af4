"""Corpus -> documents: input formats, templates, the split and the fingerprint."""

import csv
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraglm.config import END, from_dict
from fraglm.data.corpus import corpus_fingerprint, load_records, make_documents, split_documents


def make_cfg(corpus, out, vocab_size=400, **data_keys):
    return from_dict(
        {
            "data": {"path": str(corpus), "tokenized_dir": str(out), **data_keys},
            "tokenizer": {"vocab_size": vocab_size},
            "logging": {"progress": False},
        }
    )


def corpus_documents(corpus, **data_keys):
    """The documents ``corpus`` turns into, in corpus order."""
    cfg = make_cfg(corpus, "unused", **data_keys).data
    return make_documents(load_records(cfg), cfg)


# input formats


def _write_json_list(path, records):
    rows = [{"Question": r["question"], "Answer": r["answer"]} for r in records]
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def _write_csv(path, records):
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "question", "answer"])
        writer.writeheader()
        for i, r in enumerate(records):
            writer.writerow({"id": i, **r})


def _write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(records), path)


def test_jsonl_questions_and_answers_in_the_template(qa_jsonl, qa_documents):
    assert corpus_documents(qa_jsonl) == qa_documents


def test_json_list_of_objects_with_original_field_names(tmp_path, qa_records, qa_documents):
    corpus = tmp_path / "medquad_like.json"
    _write_json_list(corpus, qa_records)
    documents = corpus_documents(corpus, question_field="Question", answer_field="Answer")
    assert documents == qa_documents


@pytest.mark.parametrize(("suffix", "writer"), [(".csv", _write_csv), (".parquet", _write_parquet)])
def test_csv_and_parquet(tmp_path, qa_records, qa_documents, suffix, writer):
    # the corpus holds answers "4" and "None": text, not a number or a missing value
    assert {"4", "None"} <= {r["answer"] for r in qa_records}
    corpus = tmp_path / f"corpus{suffix}"
    writer(corpus, qa_records)
    assert corpus_documents(corpus) == qa_documents


def test_csv_with_only_numbers_in_a_field(tmp_path):
    corpus = tmp_path / "sums.csv"
    corpus.write_text("question,answer\n1+1?,2\n2+2?,4\n1/2?,0.50\n", encoding="utf-8")
    assert corpus_documents(corpus) == [
        "<|Q|>1+1?<|A|>2<|END|>",
        "<|Q|>2+2?<|A|>4<|END|>",
        "<|Q|>1/2?<|A|>0.50<|END|>",
    ]


def test_txt_one_document_per_line(tmp_path, qa_records):
    lines = [f"{r['question']} {r['answer']}".replace("\n", " ") for r in qa_records]
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert corpus_documents(corpus, text_field="text") == [line + END for line in lines]


def test_jsonl_text_field(tmp_path, qa_records, write_jsonl):
    records = [
        {"text": f"{r['question']}\n{r['answer']}", "n": i} for i, r in enumerate(qa_records)
    ]
    corpus = write_jsonl(tmp_path / "texts.jsonl", records)
    assert corpus_documents(corpus, text_field="text") == [r["text"] + END for r in records]


def test_custom_template_and_max_records(qa_jsonl, qa_records):
    template = "Question: {question}\nAnswer: {answer}<|END|>"
    documents = corpus_documents(qa_jsonl, template=template, max_records=10)
    assert documents == [template.format(**r) for r in qa_records[:10]]


# deterministic split


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 500),
    fraction=st.floats(0, 1, exclude_max=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_is_a_deterministic_partition(n, fraction, seed):
    train, val = split_documents(n, fraction, seed)
    again_train, again_val = split_documents(n, fraction, seed)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert sorted([*train.tolist(), *val.tolist()]) == list(range(n))
    assert list(train) == sorted(train) and list(val) == sorted(val)
    assert len(train) >= 1
    if fraction > 0 and n > 1:
        assert len(val) >= 1
    if fraction == 0:
        assert len(val) == 0


def test_different_seed_gives_a_different_split():
    val_sets = {tuple(split_documents(100, 0.1, seed)[1]) for seed in range(10)}
    assert len(val_sets) == 10


# the fingerprint changes exactly when the corpus or a setting that shapes the shards does


def _changed(cfg, change):
    raw = cfg.to_dict()
    for section, values in change.items():
        raw[section].update(values)
    return from_dict(raw)


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer": {"vocab_size": 401}},
        {"tokenizer": {"min_frequency": 3}},
        {"data": {"template": "<|Q|>{question}\n<|A|>{answer}<|END|>"}},
        {"data": {"max_records": 5}},
        {"data": {"split_seed": 1}},
        {"data": {"val_fraction": 0.3}},
        {"data": {"text_field": "answer"}},
        {"data": {"question_field": "answer"}},
    ],
)
def test_changed_settings_change_the_fingerprint(tmp_path, qa_jsonl, change):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    assert corpus_fingerprint(_changed(cfg, change)) != corpus_fingerprint(cfg)


def test_settings_that_do_not_shape_the_shards_keep_the_fingerprint(tmp_path, qa_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    change = {
        "data": {"num_proc": 1, "tokenized_dir": str(tmp_path / "elsewhere")},
        "model": {"n_layers": 1},
        "train": {"lr": 1e-4},
        "logging": {"progress": True},
    }
    assert corpus_fingerprint(_changed(cfg, change)) == corpus_fingerprint(cfg)


def test_same_size_edit_of_the_corpus_changes_the_fingerprint(tmp_path, qa_jsonl):
    cfg = make_cfg(qa_jsonl, tmp_path / "out")
    before = corpus_fingerprint(cfg)
    content = qa_jsonl.read_text(encoding="utf-8")
    qa_jsonl.write_text(content.replace("headache", "HEADACHE", 1), encoding="utf-8")
    assert corpus_fingerprint(cfg) != before
