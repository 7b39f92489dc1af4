"""``fraglm plot``: training curves of one or more runs, from their metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fraglm.errors import FraglmError
from fraglm.runs.loading import find_run
from fraglm.training.tracking import read_metrics


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FraglmError('plotting needs matplotlib: pip install -e ".[viz]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["tokens"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[str | None], out: Path) -> Path:
    """Loss, validation perplexity, validation bits per byte and learning rate against tokens
    seen, one colour a run (runs logged before bits per byte existed leave that panel out)."""
    plt = pyplot()
    curves = []
    for run in runs:
        run_dir = find_run(run)
        records = read_metrics(run_dir)
        if not records:
            raise FraglmError(f"{run_dir} has no metrics yet ({run_dir}/metrics.jsonl)")
        curves.append((run_dir.name, records))
    fig, (loss_ax, ppl_ax, bpb_ax, lr_ax) = plt.subplots(1, 4, figsize=(20, 4.2))
    for index, (name, records) in enumerate(curves):
        color = f"C{index}"
        loss_ax.plot(*_series(records, "train_loss"), color=color, alpha=0.8, label=f"{name} train")
        tokens, val = _series(records, "val_loss")
        loss_ax.plot(tokens, val, "o--", color=color, label=f"{name} val")
        ppl_ax.plot(tokens, [math.exp(min(v, 50.0)) for v in val], "o-", color=color, label=name)
        bpb_ax.plot(*_series(records, "val_bpb"), "o-", color=color, label=name)
        lr_ax.plot(*_series(records, "lr"), color=color, label=name)
    for ax, title in (
        (loss_ax, "loss"),
        (ppl_ax, "validation perplexity"),
        (bpb_ax, "validation bits per byte"),
        (lr_ax, "learning rate"),
    ):
        ax.set_title(title)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ppl_ax.set_yscale("log")
    return save_figure(fig, out, dpi=110)


def save_figure(fig: Any, out: Path, *, dpi: int) -> Path:
    """Lay out, write ``out`` (making its folder) and free the figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out
