"""Test setup shared by every module: never touch the network."""

import atexit
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Test models are tiny: extra threads only add waiting, a lot of it when other processes
# (the suite's own subprocesses and ranks) share the cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# Corpora that tests write are cached by `datasets` in a throwaway folder, not in ~/.cache,
# and its progress bars stay out of the captured stderr that tests read.
_HF_CACHE = tempfile.mkdtemp(prefix="fraglm-tests-hf-")
atexit.register(shutil.rmtree, _HF_CACHE, ignore_errors=True)
os.environ.setdefault("HF_DATASETS_CACHE", _HF_CACHE)
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# A small Q&A corpus with the text a tokenizer must survive: accents, Greek, Cyrillic, CJK,
# emoji and combining marks, newlines, quotes, commas and braces, numbers, "None".
_TOPICS = [
    ("a headache", "Drink water, rest in a dim room and take a break from screens."),
    ("a fever", "Rest, drink fluids; see a doctor above 39.5 °C or if it lasts > 3 days."),
    ("a cold", 'Most colds pass in 7–10 days. "Rest" is the best medicine, really.'),
    ("a café au lait spot", "Usually harmless; naïve worry. Résumé: ask a dermatologist."),
    ("Kopfschmerzen", "Viel trinken, frische Luft, Straße meiden, Ruhe. Grüße!"),
    ("πυρετός", "Ξεκουραστείτε και πίνετε νερό. Αν επιμένει, δείτε γιατρό."),
    ("простуда", "Пейте тёплый чай, отдыхайте и проветривайте комнату."),
    ("糖尿病", "血糖を定期的に測り、食事と運動に気をつけましょう。"),
    ("头痛", "多喝水，注意休息，必要时就医。"),
    ("hiccups 🙂", "Hold your breath 🫁 for a few seconds, or sip cold water 💧."),
    ("the dose {per kg}", "Line one of the answer.\nLine two, with a comma, and a {brace}."),
    ("a sprain", "R.I.C.E.: rest, ice, compression, elevation.\n\tThen move gently."),
    ("e\u0301 combining marks", "Cafe\u0301 and n\u0303 are written with combining marks."),
    ("2+2", "4"),
    ("side effects of water", "None"),
]


def _make_records() -> list[dict[str, str]]:
    records = []
    for i in range(45):
        topic, answer = _TOPICS[i % len(_TOPICS)]
        records.append(
            {
                "question": f"What should I do about {topic}? (case {i})",
                "answer": answer if i % 3 else f"{answer} Follow-up #{i}.",
            }
        )
    return records


QA_RECORDS = _make_records()


@pytest.fixture(scope="session")
def qa_records() -> list[dict[str, str]]:
    """45 Q&A records with non-ASCII text (treat as read-only)."""
    return QA_RECORDS


@pytest.fixture(scope="session")
def qa_documents(qa_records) -> list[str]:
    """The records in the default template, in corpus order."""
    return [f"<|Q|>{r['question']}<|A|>{r['answer']}<|END|>" for r in qa_records]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, records) -> path``: one JSON object a line, UTF-8."""
    return _write_jsonl


@pytest.fixture
def qa_jsonl(tmp_path, qa_records) -> Path:
    """The Q&A records as a JSON Lines corpus in the test's tmp_path."""
    return _write_jsonl(tmp_path / "corpus.jsonl", qa_records)


def _tiny_overrides(
    root: Path,
    *overrides: str,
    name: str = "run",
    corpus: Path = REPO_ROOT / "data/sample_health_qa.jsonl",
    steps: int = 12,
) -> list[str]:
    return [
        f"data.path={json.dumps(str(corpus))}",
        f"data.tokenized_dir={json.dumps(str(root / f'tokens-{name}'))}",
        f"train.out_dir={json.dumps(str(root / name))}",
        f"train.max_steps={steps}",
        "logging.progress=false",
        *overrides,
    ]


@pytest.fixture(scope="session")
def tiny_overrides():
    """``tiny_overrides(root, *overrides, name="run", corpus=sample, steps=12)``: ``--set``
    style overrides that train configs/tiny.yaml into ``root / name`` on ``corpus``."""
    return _tiny_overrides


def _train_tiny_run(tmp: Path, *overrides: str) -> Path:
    from fraglm.config import load_config
    from fraglm.training.trainer import train

    return train(
        load_config(REPO_ROOT / "configs/tiny.yaml", _tiny_overrides(tmp, *overrides))
    ).run_dir


@pytest.fixture(scope="session")
def train_tiny_run():
    """``train_tiny_run(tmp_dir, *overrides) -> run_dir``: configs/tiny.yaml for 12 steps on
    the sample corpus (a few seconds), with ``--set`` style overrides."""
    return _train_tiny_run


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The last line on stderr (where the one-line error message goes)."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""

    def assert_user_error(self, *fragments: str) -> None:
        """Exit code 2 and one line ``error: ...`` naming every fragment; no traceback."""
        assert self.exit_code == 2, (self.exit_code, self.stdout, self.stderr)
        assert "Traceback" not in self.stdout + self.stderr
        assert self.error.startswith("error: "), self.stderr
        for fragment in fragments:
            assert fragment in self.error, (fragment, self.error)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the real entry point (``fraglm.cli.app.main``) in-process: ``run_cli("tokenize", ...)``.

    An exception that is not a ``FraglmError`` escapes (``FRAGLM_DEBUG``) and fails the test.
    """
    from fraglm.cli.app import main

    monkeypatch.setenv("FRAGLM_DEBUG", "1")  # an unforeseen exception escapes main()

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["fraglm", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


aten = torch.ops.aten
# ops whose output size or value the host must read before it can go on
_SYNCING = frozenset(
    {
        aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
        aten.nonzero.default,
        aten.masked_select.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.repeat_interleave.Tensor,
    }
)
_INDEXING = frozenset({aten.index.Tensor, aten.index_put_.default, aten.index_put.default})


def _waits_for_the_device(func, args) -> bool:
    if func in _SYNCING:
        return True
    # boolean-mask indexing (x[mask], x[mask] = v) finds the mask's true positions first
    return func in _INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1])


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's (nested) arguments or results."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


class OpLog(TorchDispatchMode):
    """Record the ATen ops that run inside the block, in order.

    ``host_syncs`` lists those that make the host wait for a device's values. On CPU
    nothing waits, but the same ops on CUDA stall the host and drain the queue of launched
    kernels. (``tensor.tolist()`` and ``.cpu()`` also wait on CUDA; on CPU they issue no
    op this mode can see.) ``dtypes`` holds each op's name with the dtypes of the tensors
    it took and made. (torch 2.13 has no public home for ``TorchDispatchMode``; only
    ``torch.utils._python_dispatch``, which tests alone use.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[object] = []
        self.host_syncs: list[str] = []
        self.dtypes: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        if _waits_for_the_device(func, args):
            self.host_syncs.append(str(func))
        out = func(*args, **(kwargs or {}))
        seen = self.dtypes.setdefault(str(func), set())
        seen.update(t.dtype for t in _tensors((args, kwargs, out)))
        return out

    def ops_with(self, dtype: torch.dtype) -> list[str]:
        """The ops that took or made a tensor of ``dtype``."""
        return sorted(op for op, dtypes in self.dtypes.items() if dtype in dtypes)


@pytest.fixture
def op_log():
    """``with op_log() as log: ...``, then ``log.ops`` and ``log.host_syncs``."""
    return OpLog
