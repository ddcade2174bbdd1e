"""Numeric precision of a training run, as one small value object.

nnU-Net hard-codes fp16 autocast on CUDA inside `train_step`, `validation_step` and its predictor. A `Precision` is
applied by wrapping the network's `forward`, so the network computes in the policy's precision wherever nnU-Net
calls it (training, online validation, final validation) without re-implementing those steps: the innermost
autocast context wins over nnU-Net's outer one.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None = None  # None: autocast off (fp32 or pure low-precision weights)
    weight_dtype: torch.dtype = torch.float32
    grad_scaler: bool = False  # fp16 autocast needs loss scaling; bf16 and half-weight training do not

    def on(self, device: torch.device, keep_low_precision_on_cpu: bool = False) -> "Precision":
        """The policy as it runs on `device`. Off CUDA, autocast is dropped (nnU-Net does the same; on CPUs without
        native bf16/fp16 it is ~55x slower than fp32) and so is the CUDA-only GradScaler. fp16 weights are dropped
        too unless asked for: fp16 convolutions ran ~25x slower than fp32 on the 2-core test machine."""
        if device.type == "cuda" or keep_low_precision_on_cpu:
            return self
        return replace(self, autocast_dtype=None, grad_scaler=False, weight_dtype=torch.float32)

    @property
    def is_fp32(self) -> bool:
        return self.autocast_dtype is None and self.weight_dtype == torch.float32

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            # Explicitly off, so an outer nnU-Net autocast does not switch an fp32 network to fp16.
            return torch.autocast(device.type, enabled=False) if device.type == "cuda" else nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def apply_(self, network: nn.Module, device: torch.device) -> nn.Module:
        """Cast the weights and wrap `network.forward` (instance attribute: state dict and class stay untouched)."""
        if self.weight_dtype != torch.float32:
            network.to(dtype=self.weight_dtype)
        inner = network.forward
        weight_dtype = self.weight_dtype

        @functools.wraps(inner)
        def forward(x, *args, **kwargs):
            with self.autocast(device):
                out = inner(x.to(weight_dtype) if x.is_floating_point() else x, *args, **kwargs)
            # Low-precision weights produce fp16 logits; losses and nnU-Net's softmax/argmax expect fp32.
            return _to_float(out) if weight_dtype != torch.float32 else out

        network.forward = forward
        return network


def _to_float(out):
    if isinstance(out, (list, tuple)):
        return type(out)(o.float() for o in out)
    return out.float()


FP32 = Precision("fp32")
AMP = Precision("amp", autocast_dtype=torch.float16, grad_scaler=True)
BF16 = Precision("bf16", autocast_dtype=torch.bfloat16)
HALF = Precision("half", weight_dtype=torch.float16)
