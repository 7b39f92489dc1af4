"""metrics.jsonl: a fresh file per run, truncated to the checkpoint on resume, strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

from fraglm.config import Config
from fraglm.runs.layout import METRICS_FILE
from fraglm.training.tracking import Tracker, read_metrics


def _strict(line: str) -> dict:
    """Parse as strict JSON: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def _write_run(run_dir: Path, last_step: int) -> None:
    tracker = Tracker(run_dir, Config())
    for step in range(1, last_step + 1):
        tracker.log({"step": step, "train_loss": 1.0 / step})
        if step % 4 == 0:
            tracker.log({"step": step, "val_loss": 2.0 / step})
    tracker.close()


def test_a_new_run_starts_an_empty_file(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 99, "train_loss": 0.1}\n')
    Tracker(tmp_path, Config()).close()
    assert read_metrics(tmp_path) == []


def test_resume_drops_records_past_the_checkpoint_and_appends(tmp_path):
    _write_run(tmp_path, 10)  # the interrupted run logged up to step 10, saved at step 8
    tracker = Tracker(tmp_path, Config(), resume_step=8)
    kept = read_metrics(tmp_path)
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert kept[-1] == {"step": 8, "val_loss": 0.25}  # the evaluation at the checkpoint stays
    tracker.log({"step": 9, "train_loss": 0.5})
    tracker.close()
    assert [r["step"] for r in read_metrics(tmp_path)][-3:] == [8, 8, 9]


def test_a_line_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path):
    _write_run(tmp_path, 3)
    with (tmp_path / METRICS_FILE).open("a") as fh:
        fh.write('{"step": 4, "train_lo')  # killed mid-write
    Tracker(tmp_path, Config(), resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_non_finite_values_are_written_as_null(tmp_path):
    tracker = Tracker(tmp_path, Config())
    tracker.log({"step": 1, "train_loss": float("nan"), "val_loss": float("inf"), "lr": 1e-3})
    tracker.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [_strict(line) for line in lines] == [
        {"step": 1, "train_loss": None, "val_loss": None, "lr": 1e-3}
    ]
