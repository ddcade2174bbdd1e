"""Finding convs in a model under all their names, and swapping a module everywhere it is referenced.

nnU-Net's PlainConvUNet reaches each conv under several names (`...convs.N.conv`, `...convs.N.all_modules.0`, and
again below `decoder.encoder`): a replacement must land in every slot, or the copies drift apart and the state
dict inflates. The canonical name of a module is its first name in `model.named_modules()`.
"""
from __future__ import annotations

from torch import nn

from .cost import SUPPORTED_CONVS
from .layers import TuckerConv


def conv_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(conv) -> all its names in `model`, canonical first. Convs inside an existing TuckerConv are not listed
    (already factorized)."""
    names: dict[int, list[str]] = {}
    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, TuckerConv):
            inside.update(id(c) for c in m.modules() if c is not m)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, SUPPORTED_CONVS) and id(m) not in inside:
            names.setdefault(id(m), []).append(name)
    return names


def unique_convs(model: nn.Module) -> list[tuple[str, list[str], nn.Module]]:
    """[(canonical name, other names, conv)] in `named_modules()` order, one entry per conv object."""
    modules = {id(m): m for m in model.modules()}
    return [(names[0], names[1:], modules[key]) for key, names in conv_aliases(model).items()]


def parent_refs(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) slot that holds it."""
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in {id(m): m for m in model.modules()}.values():
        for key, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, key))
    return refs


def replace_everywhere(refs: dict, old: nn.Module, new: nn.Module, name: str) -> None:
    """Put `new` into every slot of `old` (aliases stay one shared module)."""
    slots = refs.get(id(old), [])
    if not slots:
        raise ValueError(f"layer '{name}' is the model itself or not reachable from it; cannot replace it")
    for parent, key in slots:
        parent._modules[key] = new


def canonical_name(model: nn.Module, alias: str) -> str | None:
    target = dict(model.named_modules(remove_duplicate=False)).get(alias)
    if target is None:
        return None
    return next(n for n, m in model.named_modules() if m is target)
