"""Numeric precision of a training run, as one small value object.

A `Precision` has two parts, applied in two places:

- **autocast** (`autocast(device)`): entered by the green trainer's own `train_step` and `validation_step` (nnU-Net's
  versions hard-code fp16 autocast on CUDA). The network itself is not changed.
- **weight dtype** (`prepare_(network)`): the weights are cast once, and for non-fp32 weights two forward hooks are
  registered: a pre-hook that casts floating inputs to the dtype of the module's own weights and a post-hook that
  returns fp32 outputs (losses, softmax and nnU-Net's predictor expect fp32 logits). The hooks are plain
  module-level functions that receive the module they run on, so the mechanism survives `copy.deepcopy` (a copy
  computes with its own weights: EMA, teacher/student and SWA code rely on that) and pickling, and it applies
  wherever the network is called: training, online validation, and nnU-Net's final validation, whose predictor
  calls the network directly. `state_dict` keys and the network's class are untouched.
"""
from __future__ import annotations

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
        """The autocast context of this policy for a step on `device`."""
        if self.autocast_dtype is None:
            # Explicitly off on CUDA, so an fp32 (or half-weight) step is not switched to fp16 by an outer context.
            return torch.autocast(device.type, enabled=False) if device.type == "cuda" else nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare_(self, network: nn.Module) -> nn.Module:
        """Cast the weights to `weight_dtype`; for low-precision weights register the input/output hooks (once).

        `network` may be wrapped by torch.compile (`_orig_mod`): the hooks go on the module that owns the weights,
        so they travel with it (and with any deep copy of it)."""
        if self.weight_dtype == torch.float32:
            return network
        network.to(dtype=self.weight_dtype)
        module = getattr(network, "_orig_mod", network)
        if cast_input_to_weight_dtype not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(cast_input_to_weight_dtype)
        if float_output not in module._forward_hooks.values():
            module.register_forward_hook(float_output)
        return network


def cast_input_to_weight_dtype(module: nn.Module, args: tuple):
    """Forward pre-hook: floating tensor arguments follow the dtype of the module's own (first floating) weights."""
    dtype = weight_dtype_of(module)
    if dtype is None:
        return None
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != dtype else a
                 for a in args)


def float_output(module: nn.Module, args: tuple, output):
    """Forward hook: floating outputs (a tensor, or the list/tuple of deep supervision) as fp32."""
    return _to_float(output)


def weight_dtype_of(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _to_float(out):
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    if torch.is_tensor(out) and out.is_floating_point() and out.dtype != torch.float32:
        return out.float()
    return out


FP32 = Precision("fp32")
AMP = Precision("amp", autocast_dtype=torch.float16, grad_scaler=True)
BF16 = Precision("bf16", autocast_dtype=torch.bfloat16)
HALF = Precision("half", weight_dtype=torch.float16)
POLICIES = (FP32, AMP, BF16, HALF)
