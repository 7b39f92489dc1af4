"""The command line: every bad input is one line on stderr and exit code 2, never a traceback."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fraglm.cli import logs
from fraglm.config import END
from fraglm.data.corpus import split_documents
from fraglm.data.shards import load_run_tokenizer, load_tokens, read_meta
from fraglm.data.tokenizer import decode

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "sample_health_qa.jsonl"


def tokenize_args(corpus, out, *extra):
    """`fraglm tokenize` on ``corpus`` into ``out`` with a tiny vocabulary."""
    args = ["tokenize"]
    for item in (
        f"data.path={json.dumps(str(corpus))}",
        f"data.tokenized_dir={json.dumps(str(out))}",
        "tokenizer.vocab_size=400",
        "logging.progress=false",
        *extra,
    ):
        args += ["--set", item]
    return args


def snapshot(root):
    return {p.name: p.read_bytes() for p in sorted(Path(root).iterdir())}


def test_tokenize_reports_what_it_did(run_cli, tmp_path, qa_jsonl, qa_records):
    result = run_cli(*tokenize_args(qa_jsonl, tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert f"-> {tmp_path / 'out'}" in result.stdout
    assert f"{len(qa_records)} documents" in result.stdout
    assert read_meta(tmp_path / "out")["vocab_size"] <= 400


# corpus problems


def test_missing_corpus_file(run_cli, tmp_path):
    missing = tmp_path / "nope.jsonl"
    run_cli(*tokenize_args(missing, tmp_path / "out")).assert_user_error(
        "corpus file not found", str(missing)
    )
    assert not (tmp_path / "out").exists()


def test_empty_corpus_file(run_cli, tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_bytes(b"")
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error("empty.jsonl is empty")


@pytest.mark.parametrize(
    ("name", "content"), [("blank.jsonl", "\n\n  \n"), ("list.json", "[]\n"), ("h.csv", "q,a\n")]
)
def test_corpus_with_zero_records(run_cli, tmp_path, name, content):
    corpus = tmp_path / name
    corpus.write_text(content, encoding="utf-8")
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error(f"{name} has no records")


def test_record_without_the_mapped_field(run_cli, tmp_path, write_jsonl):
    records = [{"question": "Why?", "reply": "Because."}, {"question": "How?", "reply": "So."}]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error(
        "no field 'answer'", "its fields are: question, reply"
    )
    # and the hint is right: mapping the field makes it work
    ok = run_cli(*tokenize_args(corpus, tmp_path / "out", "data.answer_field=reply"))
    assert ok.exit_code == 0, ok.stderr


def test_one_record_lacks_the_field(run_cli, tmp_path, write_jsonl):
    records = [{"question": "Why?", "answer": "Because."}, {"question": "How?"}]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error("record 1", "'answer'")


def test_text_file_without_text_field(run_cli, tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("one line\nanother\n", encoding="utf-8")
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error(
        "no field 'question'", "its fields are: text"
    )


def test_record_with_null_field(run_cli, tmp_path, write_jsonl):
    records = [{"question": "Why?", "answer": "Because."}, {"question": "How?", "answer": None}]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error(
        "record 1", "'answer'", "None"
    )


def test_record_with_a_number_in_a_text_field(run_cli, tmp_path, write_jsonl):
    records = [{"question": "Why?", "answer": "Because."}, {"question": "2+2?", "answer": 4}]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error("record 1", "'answer'", "4")


def test_empty_csv_cell_is_a_missing_value(run_cli, tmp_path):
    corpus = tmp_path / "c.csv"
    corpus.write_text("question,answer\nWhy?,Because.\nHow?,\n", encoding="utf-8")
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error("record 1", "'answer'")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_non_utf8_bytes(run_cli, tmp_path, suffix):
    corpus = tmp_path / f"latin1{suffix}"
    lines = ['{"question": "a", "answer": "b"}', '{"question": "c", "answer": "d"}']
    corpus.write_bytes(("\n".join(lines) + "\n").encode() + b'{"question": "caf\xe9"}\n')
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error("not valid UTF-8", "line 3")


def test_truncated_utf8_at_end_of_file(run_cli, tmp_path):
    corpus = tmp_path / "cut.jsonl"
    corpus.write_bytes('{"question": "糖", "answer": "尿"}\n'.encode() + "病".encode()[:2])
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error("not valid UTF-8")


def test_malformed_json_line(run_cli, tmp_path):
    corpus = tmp_path / "broken.jsonl"
    corpus.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answ\n')
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error(
        "broken.jsonl could not be read", "JSON"
    )


def test_unsupported_file_type(run_cli, tmp_path):
    corpus = tmp_path / "corpus.xlsx"
    corpus.write_bytes(b"PK\x03\x04")
    run_cli(*tokenize_args(corpus, tmp_path / "out")).assert_user_error(
        "unsupported file type '.xlsx'", ".jsonl"
    )


def test_hub_dataset_while_offline(run_cli, tmp_path):
    run_cli(
        "tokenize",
        "--set",
        "data.path=someone/some-medical-qa",
        "--set",
        f"data.tokenized_dir={json.dumps(str(tmp_path / 'out'))}",
    ).assert_user_error("'someone/some-medical-qa'", "offline")


def test_vocab_size_too_small(run_cli, tmp_path, qa_jsonl):
    run_cli(
        *tokenize_args(qa_jsonl, tmp_path / "out", "tokenizer.vocab_size=259")
    ).assert_user_error("tokenizer.vocab_size", "259", ">= 260")


def test_smallest_vocab_size_works(run_cli, tmp_path, qa_jsonl):
    result = run_cli(*tokenize_args(qa_jsonl, tmp_path / "out", "tokenizer.vocab_size=260"))
    assert result.exit_code == 0, result.stderr
    assert read_meta(tmp_path / "out")["vocab_size"] == 260


# config problems


def test_missing_config_file(run_cli, tmp_path):
    missing = tmp_path / "nope.yaml"
    for command in (["tokenize"], ["config", "show"]):
        run_cli(*command, "--config", missing).assert_user_error(
            "config file not found", str(missing)
        )


def test_bad_yaml(run_cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: [oops\ntrain:\n  lr: 1\n", encoding="utf-8")
    run_cli("tokenize", "-c", path).assert_user_error("bad.yaml is not valid YAML", "line")


def test_unknown_config_key_names_the_closest(run_cli, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("tokenizer:\n  vocab_sise: 400\n", encoding="utf-8")
    run_cli("tokenize", "-c", path).assert_user_error(
        "unknown config key 'tokenizer.vocab_sise'", "did you mean 'tokenizer.vocab_size'"
    )
    run_cli("tokenize", "--set", "data.valfraction=0.1").assert_user_error(
        "did you mean 'data.val_fraction'"
    )


def test_wrong_type(run_cli):
    run_cli("tokenize", "--set", "tokenizer.vocab_size=big").assert_user_error(
        "'tokenizer.vocab_size' = 'big'", "expected an integer"
    )


def test_out_of_range(run_cli):
    run_cli("tokenize", "--set", "data.val_fraction=1.5").assert_user_error(
        "'data.val_fraction' = 1.5", "must be < 1"
    )


def test_template_with_unknown_placeholder(run_cli, tmp_path, qa_jsonl):
    path = tmp_path / "t.yaml"
    path.write_text('data:\n  template: "<|Q|>{question}<|A|>{answer}{source}"\n')
    run_cli(*tokenize_args(qa_jsonl, tmp_path / "out"), "-c", path).assert_user_error(
        "'data.template'", "placeholders"
    )


def test_bad_override_syntax(run_cli):
    run_cli("tokenize", "--set", "vocab_size=400").assert_user_error("section.key=value")


# failures keep earlier results


@pytest.mark.parametrize(
    "bad",
    [
        ["data.answer_field=reply"],
        ["data.path=/nonexistent/corpus.jsonl"],
        ["tokenizer.vocab_size=100"],
        ["data.template='{question}'"],
    ],
    ids=["bad field", "missing corpus", "bad value", "bad template"],
)
def test_failed_rerun_keeps_previous_output(run_cli, tmp_path, qa_jsonl, bad):
    out = tmp_path / "out"
    assert run_cli(*tokenize_args(qa_jsonl, out)).exit_code == 0
    before = snapshot(out)
    run_cli(*tokenize_args(qa_jsonl, out, *bad)).assert_user_error()
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out"]


# the real entry point, as a user runs it


@pytest.mark.parametrize(
    "args",
    [
        ["tokenize", "--set", "data.path=missing/corpus.jsonl"],
        ["config", "show", "--config", "missing.yaml"],
        ["config", "show", "--set", "model.n_heads=3"],
    ],
    ids=["missing corpus", "missing config", "bad value"],
)
def test_python_m_fraglm_exit_code_and_one_line(tmp_path, args):
    proc = subprocess.run(
        [sys.executable, "-m", "fraglm", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_usage_errors_are_exit_code_2(run_cli):
    result = run_cli("tokenize", "--no-such-option")
    assert result.exit_code == 2
    assert "Traceback" not in result.stdout + result.stderr


# the shipped sample corpus


@pytest.mark.skipif(not SAMPLE.is_file(), reason="data/sample_health_qa.jsonl not written yet")
def test_sample_corpus_tokenizes_with_tiny_config(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs name the corpus relative to the repository
    out = tmp_path / "tiny"
    result = run_cli(
        "tokenize",
        "-c",
        "configs/tiny.yaml",
        "--set",
        f"data.tokenized_dir={json.dumps(str(out))}",
        "--set",
        "logging.progress=false",
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    documents = [f"<|Q|>{r['question']}<|A|>{r['answer']}<|END|>" for r in records]
    meta = read_meta(out)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(documents)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 512
    train_idx, val_idx = split_documents(len(documents), 0.1, meta["split_seed"])
    tok = load_run_tokenizer(out)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        text = decode(tok, load_tokens(out, split).tolist())
        assert text == "".join(documents[i] for i in idx)
        assert text.count(END) == len(idx)


# logging


@pytest.mark.parametrize(
    ("rank", "all_ranks", "shown"),
    [(None, None, True), ("0", None, True), ("1", None, False), ("1", "1", True)],
)
def test_status_lines_come_from_rank_zero(monkeypatch, capsys, rank, all_ranks, shown):
    """The command shows fraglm's log lines plainly on stdout; under torchrun only rank 0's,
    unless FRAGLM_LOG_ALL_RANKS=1."""
    for name, value in (("RANK", rank), (logs.LOG_ALL_RANKS_ENV, all_ranks)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    logs.configure_logging()
    logs.configure_logging()  # once per command: never a second handler
    logging.getLogger("fraglm.training.trainer").info("step %d: val loss %.4f", 3, 1.5)
    out, err = capsys.readouterr()
    assert (out, err) == (("step 3: val loss 1.5000\n" if shown else ""), "")
