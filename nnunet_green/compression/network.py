"""nnU-Net integration: a network "class" that nnU-Net's get_network_from_plans can locate with pydoc.

A compressed model folder's plans.json names NETWORK_CLASS_NAME with the dense class and the per-layer ranks in
`arch_kwargs`; nnU-Net (stock predictor, TotalSegmentator) then builds the dense network, this module swaps the
listed convs for TuckerConv of the same ranks, and the checkpoint strict-loads.
"""
from __future__ import annotations

import copy
import pydoc

from torch import nn

from nnunet_green.contract import DENSE_CLASS_KEY, NETWORK_CLASS_NAME, RANKS_KEY

from .api import factorize_structure_

# DENSE_CLASS_KEY / RANKS_KEY: the keys this module adds to arch_kwargs; everything else goes to the dense class
__all__ = ["NETWORK_CLASS_NAME", "DENSE_CLASS_KEY", "RANKS_KEY", "TuckerFactorizedNetwork", "factorized_architecture",
           "build_network_from_plans", "build_dense_from_plans", "dense_architecture"]


def _locate(cls_or_name):
    if not isinstance(cls_or_name, str):
        return cls_or_name
    cls = pydoc.locate(cls_or_name)
    if cls is None:
        raise ImportError(f"{DENSE_CLASS_KEY}='{cls_or_name}' could not be imported")
    return cls


def TuckerFactorizedNetwork(input_channels: int, num_classes: int, dense_network_class,
                            tucker_ranks: dict, **dense_arch_kwargs) -> nn.Module:
    """Build `dense_network_class(input_channels=..., num_classes=..., **dense_arch_kwargs)` and replace the convs
    named in `tucker_ranks` ({canonical name: [r_in, r_out]}) by TuckerConv (structure only, weights arbitrary).

    A factory, not a class: it returns an instance of the dense class (for PlainConvUNet and ResidualEncoderUNet,
    of its fast-path subclass, see fast_path.py), so `network.decoder.deep_supervision`, `network.initialize` and
    the state-dict keys of untouched layers are exactly those of the dense network (plus the optional fast-path
    artefact). `dense_arch_kwargs` arrive import-resolved (nnU-Net resolves `_kw_requires_import` before calling).
    """
    from .fast_path import fast_class, say_once

    dense_cls = _locate(dense_network_class)
    cls = fast_class(dense_cls)
    if cls is None:
        cls = dense_cls
        say_once(f"class:{dense_cls.__name__}", f"no fast CPU path for {dense_cls.__name__} networks (only "
                 "PlainConvUNet and ResidualEncoderUNet): the compressed network runs eagerly in PyTorch")
    net = cls(input_channels=input_channels, num_classes=num_classes, **dense_arch_kwargs)
    factorize_structure_(net, {k: tuple(v) for k, v in tucker_ranks.items()})
    return net


tucker_factorized_network = TuckerFactorizedNetwork  # snake_case alias; plans use NETWORK_CLASS_NAME


def factorized_architecture(architecture: dict, ranks: dict) -> dict:
    """New-format plans `architecture` entry for the compressed network, from the dense entry
    ({network_class_name, arch_kwargs, _kw_requires_import}) and {name: [r_in, r_out]}."""
    if architecture["network_class_name"] == NETWORK_CLASS_NAME:
        raise ValueError("architecture is already a Tucker-factorized network")
    kwargs = copy.deepcopy(architecture["arch_kwargs"])
    kwargs[DENSE_CLASS_KEY] = architecture["network_class_name"]
    kwargs[RANKS_KEY] = {k: [int(v[0]), int(v[1])] for k, v in ranks.items()}
    return {"network_class_name": NETWORK_CLASS_NAME, "arch_kwargs": kwargs,
            "_kw_requires_import": list(architecture["_kw_requires_import"])}


def _plans_managers(plans, configuration: str):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans) if isinstance(plans, dict) else str(plans))
    return pm, pm.get_configuration(configuration)


def _io_channels(pm, cm, dataset_json, input_channels, num_classes):
    if dataset_json is not None:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        if not isinstance(dataset_json, dict):
            import json
            with open(dataset_json) as f:
                dataset_json = json.load(f)
        input_channels = determine_num_input_channels(pm, cm, dataset_json)
        num_classes = pm.get_label_manager(dataset_json).num_segmentation_heads
    if input_channels is None or num_classes is None:
        raise ValueError("give dataset_json, or both input_channels and num_classes")
    return input_channels, num_classes


def build_network_from_plans(plans, configuration: str, dataset_json=None, *, input_channels: int | None = None,
                             num_classes: int | None = None, deep_supervision: bool = False,
                             dense: bool = False, allow_init: bool = True) -> nn.Module:
    """The network nnU-Net would build for `configuration` of `plans` (dict or plans.json path; old-format plans
    are converted by nnU-Net's ConfigurationManager). `dense=True` drops a Tucker wrapper and builds the dense
    network it wraps."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    pm, cm = _plans_managers(plans, configuration)
    input_channels, num_classes = _io_channels(pm, cm, dataset_json, input_channels, num_classes)
    name, kwargs = cm.network_arch_class_name, dict(cm.network_arch_init_kwargs)
    if dense and name == NETWORK_CLASS_NAME:
        name = kwargs.pop(DENSE_CLASS_KEY)
        kwargs.pop(RANKS_KEY)
    return get_network_from_plans(name, kwargs, cm.network_arch_init_kwargs_req_import, input_channels,
                                  num_classes, allow_init=allow_init, deep_supervision=deep_supervision)


def build_dense_from_plans(plans, configuration: str, dataset_json=None, **kwargs) -> nn.Module:
    """Dense network of `configuration` (see build_network_from_plans)."""
    return build_network_from_plans(plans, configuration, dataset_json, dense=True, **kwargs)


def dense_architecture(plans, configuration: str) -> dict:
    """New-format `architecture` entry of a configuration (old-format plans converted by nnU-Net)."""
    _, cm = _plans_managers(plans, configuration)
    return {"network_class_name": cm.network_arch_class_name,
            "arch_kwargs": copy.deepcopy(cm.network_arch_init_kwargs),
            "_kw_requires_import": list(cm.network_arch_init_kwargs_req_import)}
