"""An exponential moving average of the trained weights (EMA): what a run
validates, checkpoints and publishes, while the optimizer steps the live
weights.

A small dataset trained at a high learning rate moves its weights a long
way each step, so the weights of any one step carry that step's noise:
which rows it saw, which prompt words it left out. Their running average
is a smoother point, and in the measurements in the README it answers more
held-out paraphrases. It also makes validation a steadier signal, so early
stopping and the choice of checkpoint react less to one noisy step.
"""

from __future__ import annotations

import contextlib

import torch

# Early on the average follows the weights closely: the decay at update n is
# at most (1 + n) / (WARMUP + n), so the first steps (far from where
# training goes) do not weigh on it for long.
WARMUP = 10


class WeightAverage:
    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params = params
        self.decay = decay
        # float32 whatever the weights' dtype: a tenth of a small change must not round away.
        self.average = [p.detach().float().clone() for p in params]
        self._live: list[torch.Tensor] | None = None  # the live weights, while the average is applied

    def update(self, step: int) -> None:
        """Folds the weights after optimizer step `step` (1-based) into the average."""
        decay = min(self.decay, (1 + step) / (WARMUP + step))
        with torch.no_grad():
            for average, param in zip(self.average, self.params, strict=True):
                average.lerp_(param.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def applied(self):
        """The average in the weights' place for the block (validation,
        checkpoint); the live weights are back afterwards."""
        self._live = [p.detach().clone() for p in self.params]
        self._copy(self.average, self.params)
        try:
            yield
        finally:
            self._copy(self._live, self.params)
            self._live = None

    def live_weights(self) -> list[torch.Tensor]:
        """The weights the optimizer steps (also while the average is applied)."""
        return self._live if self._live is not None else [p.detach().clone() for p in self.params]

    def restore(self, live: list[torch.Tensor] | None) -> None:
        """After a resume from a checkpoint, whose weights are the average:
        the average starts from them, and training goes on from the live
        weights the checkpoint kept beside them (if any)."""
        self.average = [p.detach().float().clone() for p in self.params]
        if live is not None:
            self._copy(live, self.params)

    @staticmethod
    def _copy(source: list[torch.Tensor], target: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for s, t in zip(source, target, strict=True):
                t.copy_(s)
