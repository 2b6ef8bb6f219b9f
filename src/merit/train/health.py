"""Training that goes nowhere fails loudly, like a NaN loss does.

A learning rate far too high can saturate a model in one step: the loss then sits at a constant (often
ln(vocabulary)) and every gradient is exactly zero, and the Trainer "succeeds" with a branch that learned
nothing. These rules read only the logged loss and gradient norm, so they cost nothing.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from merit.errors import MeritError

ZERO_GRAD_STEPS = 3  # consecutive logged steps with a gradient norm of exactly zero
FLAT_LOSS_STEPS = 20  # consecutive logged steps whose loss equals the previous one (relative 1e-7)


class TrainingStalled(MeritError):
    """The loss stopped moving or the gradients vanished; the branch is reported as failed."""


class StopOnStall(TrainerCallback):
    """Raise :class:`TrainingStalled` when the gradient norm is 0 for ``zero_steps`` logged steps in a row,
    or the loss is unchanged for ``flat_steps`` in a row. Needs ``logging_steps=1`` (merit's trainer)."""

    def __init__(self, learning_rate: float, zero_steps: int = ZERO_GRAD_STEPS, flat_steps: int = FLAT_LOSS_STEPS):
        self.lr, self.zero_steps, self.flat_steps = learning_rate, zero_steps, flat_steps
        self.zeros = self.flat = 0
        self.last: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if norm is not None:
            self.zeros = self.zeros + 1 if float(norm) == 0.0 else 0
        if loss is not None and math.isfinite(loss):
            same = self.last is not None and abs(loss - self.last) <= 1e-7 * max(1.0, abs(self.last))
            self.flat = self.flat + 1 if same else 0
            self.last = loss
        where = f"step {state.global_step}/{state.max_steps}"
        hint = f"lower train.learning_rate (now {self.lr:g}) or check the data and trainable parameters"
        if self.zeros >= self.zero_steps:
            raise TrainingStalled(f"training stalled: gradient norm is 0 for {self.zeros} steps in a row "
                                  f"({where}, loss {loss}); {hint}")
        if self.flat >= self.flat_steps:
            raise TrainingStalled(f"training stalled: loss unchanged at {self.last:.6g} for {self.flat} steps "
                                  f"({where}); {hint}")
