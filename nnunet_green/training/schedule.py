"""nnU-Net's poly learning rate, with a cool-down that a plateau stop can switch on.

nnU-Net's schedule reaches a learning rate near 0 only at its last epoch, and the last epochs of that annealing are
worth real Dice (a measured Hippocampus run: EMA pseudo-Dice 0.837 around a plateau, 0.856 after the full schedule's
final ten epochs). A run stopped at a plateau never gets them. `cool_down(first_epoch, epochs)` compresses the rest
of the schedule into `epochs`: the same poly curve, from the rate the run has at `first_epoch` down towards 0.
"""
from __future__ import annotations

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


class CoolDownPolyLR(PolyLRScheduler):
    """`PolyLRScheduler` (what nnU-Net steps with the epoch index) plus an optional shortened tail."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, exponent: float = 0.9):
        self.cool_down_from: int | None = None
        self.cool_down_epochs = 0
        super().__init__(optimizer, initial_lr, max_steps, exponent)

    def cool_down(self, first_epoch: int, epochs: int) -> None:
        if epochs < 1:
            raise ValueError(f"a cool-down needs at least one epoch, got {epochs}")
        self.cool_down_from, self.cool_down_epochs = first_epoch, epochs

    def cancel_cool_down(self) -> None:
        self.cool_down_from, self.cool_down_epochs = None, 0

    def lr_at(self, step: int) -> float:
        poly = lambda done, total: (1 - done / total) ** self.exponent  # noqa: E731
        if self.cool_down_from is None or step < self.cool_down_from:
            return self.initial_lr * poly(step, self.max_steps)
        start = self.initial_lr * poly(min(self.cool_down_from, self.max_steps - 1), self.max_steps)
        # epoch k of c runs at (1 - (k+1)/(c+1))^0.9 of the start rate: lower from the first cooled epoch on, and
        # the last one is not wasted at a rate of 0
        done = min(step - self.cool_down_from, self.cool_down_epochs - 1) + 1
        return start * poly(done, self.cool_down_epochs + 1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
