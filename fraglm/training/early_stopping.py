"""The best validation loss so far, for the best checkpoint and for
``train.early_stopping_patience``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BestValidation:
    """The best loss, the step it was reached at, and the evaluations since then that did
    not improve on it (all three are in the checkpoint, so a resumed run counts on)."""

    loss: float | None = None
    step: int | None = None
    evals_since: int = 0

    def record(self, loss: float, step: int) -> bool:
        """Count one evaluation; True when ``loss`` is a new best."""
        if self.loss is None or loss < self.loss:
            self.loss, self.step, self.evals_since = loss, step, 0
            return True
        self.evals_since += 1
        return False

    def patience_exhausted(self, patience: int) -> bool:
        """True once ``patience`` evaluations (0: never) have not improved."""
        return patience > 0 and self.evals_since >= patience
