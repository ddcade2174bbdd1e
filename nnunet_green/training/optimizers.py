"""Optimizers of the green trainers, each a small named recipe.

`nnunet_sgd` is nnU-Net's own default (SGD, momentum 0.99, Nesterov). The 8-bit recipes use bitsandbytes
(>= 0.50 also steps on CPU tensors). Two differences from nnU-Net's SGD are inherent to bitsandbytes and documented
in docs/training.md: `SGD8bit` is heavy-ball momentum (it never reads `nesterov`), and parameters with fewer than
4096 elements (biases, norm weights) keep 32-bit state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class OptimizerRecipe:
    name: str
    build: Callable[..., torch.optim.Optimizer]  # (params, lr, weight_decay) -> optimizer
    initial_lr: float | None = None  # None: keep the trainer's (nnU-Net: 1e-2)


def _sgd(params: Iterable, lr: float, weight_decay: float):
    return torch.optim.SGD(params, lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)


def _sgd_8bit(params: Iterable, lr: float, weight_decay: float):
    import bitsandbytes as bnb

    return bnb.optim.SGD8bit(params, lr, momentum=0.99, weight_decay=weight_decay)


def _adamw_8bit(params: Iterable, lr: float, weight_decay: float):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr, weight_decay=weight_decay)


NNUNET_SGD = OptimizerRecipe("SGD", _sgd)
SGD_8BIT = OptimizerRecipe("SGD8bit", _sgd_8bit)
# 3e-4 is nnU-Net's own learning rate for its Adam variant (nnUNetTrainerVanillaAdam3en4); 1e-2 diverges with Adam.
ADAMW_8BIT = OptimizerRecipe("AdamW8bit", _adamw_8bit, initial_lr=3e-4)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state (momentum buffers, 8-bit codes, quantization maps).

    bitsandbytes shares one quantization map between all parameters: each storage is counted once."""
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    }
    return sum(storages.values())
