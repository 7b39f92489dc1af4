"""fp16's gradient scaler skips a step with non-finite gradients and halves its scale; a
model that overflows at every scale would skip steps forever. This stops such a run."""

from __future__ import annotations

from pathlib import Path

import torch

from fraglm.errors import FraglmError


class SkippedStepGuard:
    """Counts the steps skipped in a row, read from drops of the scaler's scale."""

    def __init__(self, scaler: torch.amp.GradScaler, limit: int) -> None:
        self._scaler, self._limit = scaler, limit
        self._in_a_row, self._last_scale = 0, scaler.get_scale()

    def check(self, step: int, run_dir: Path) -> None:
        """Raise once ``limit`` steps in a row were skipped. Called where the device has
        just caught up (the loss read), so reading the scale, which the previous step's
        update set, waits for nothing; a drop means that step was skipped."""
        if not self._scaler.is_enabled():
            return
        scale = self._scaler.get_scale()
        self._in_a_row = self._in_a_row + 1 if scale < self._last_scale else 0
        self._last_scale = scale
        if self._in_a_row >= self._limit:
            raise FraglmError(
                f"the last {self._limit} steps were skipped for non-finite fp16 gradients (loss "
                f"scale now {scale:g}); stopped at step {step}, the last good checkpoint "
                f"in {run_dir} is kept (try train.precision=fp32 or bf16, a lower "
                "train.lr, or a larger train.max_skipped_steps)"
            )
