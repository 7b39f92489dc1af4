"""``fraglm attention``: heatmaps of a trained model's attention over a prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from fraglm.attention.maps import attention_weights
from fraglm.errors import FraglmError
from fraglm.inference.generate import prompt_text
from fraglm.runs.loading import LoadedRun, load_run
from fraglm.tools.plot import pyplot, save_figure


def prompt_attention(run: LoadedRun, text: str) -> tuple[list[str], torch.Tensor]:
    """Token labels and weights (layers, heads, T, T) of ``run`` reading ``text``."""
    ids = run.tokenizer.encode(text).ids
    context = run.cfg.model.context_length
    if not ids:
        raise FraglmError("the text encodes to no tokens")
    if len(ids) > context:
        raise FraglmError(f"the text is {len(ids)} tokens; the model's context is {context}")
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple) -> None:
        x, rope = args[0], args[1]
        q, k, _ = module.project(x, rope)
        weights = attention_weights(q, k, fragment_size=run.cfg.model.fragment_size)
        captured.append(weights[0])

    hooks = [block.attn.register_forward_pre_hook(capture) for block in run.model.blocks]
    try:
        with torch.no_grad():
            run.model(torch.tensor([ids], device=run.device))
    finally:
        for hook in hooks:
            hook.remove()
    labels = [run.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return labels, torch.stack(captured).cpu()


def _selection(value: str, count: int, what: str) -> list[int]:
    if value == "all":
        return list(range(count))
    try:
        index = int(value)
    except ValueError:
        raise FraglmError(f"--{what} must be a number or 'all', not {value!r}") from None
    if not 0 <= index < count:
        raise FraglmError(
            f"--{what} {index} does not exist: the model has {count} ({what} 0-{count - 1})"
        )
    return [index]


def draw_attention(
    run_name: str | None, text: str, *, layer: str, head: str, out: Path, raw: bool = False
) -> Path:
    """Heatmap of one layer/head, or a grid when ``layer`` or ``head`` is ``all``."""
    plt = pyplot()
    run = load_run(run_name, device="cpu")
    layers = _selection(layer, run.cfg.model.n_layers, "layer")
    heads = _selection(head, run.cfg.model.n_heads, "head")
    labels, weights = prompt_attention(run, prompt_text(text, raw=raw))
    shown = [repr(t)[1:-1] for t in labels]
    size = max(3.0, 0.28 * len(labels) + 1.5)
    cells = [(li, hi) for li in layers for hi in heads]
    # one row per layer; a single layer's heads wrap four to a row
    columns = len(heads) if len(layers) > 1 else min(len(heads), 4)
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for index, (li, hi) in enumerate(cells):
        ax = axes[index // columns][index % columns]
        ax.imshow(weights[li, hi].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {li}, head {hi}", fontsize=9)
        if len(labels) <= 64:
            ax.set_xticks(range(len(labels)), shown, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels)), shown, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return save_figure(fig, out, dpi=100)
