"""Tucker-2 compression of nnU-Net convolutions (see docs/compression.md).

    from nnunet_green.compression import TuckerConfig, tucker_
    records = tucker_(network, TuckerConfig(rank_ratio=0.12))
"""
from .api import (LayerRecord, TuckerConfig, conv_aliases, factorize_structure_, mac_fraction, plan_layer, ranks_of,
                  tucker_)
from .decompose import decompose_conv_weight, tucker_ranks
from .layers import PointwiseConv2d, PointwiseConv3d, TuckerConv, gemm_pointwise_
from .macs import count_macs, executed_params, mac_breakdown

__all__ = ["TuckerConfig", "tucker_", "TuckerConv", "LayerRecord", "count_macs", "factorize_structure_",
           "mac_breakdown", "executed_params", "ranks_of", "tucker_ranks", "decompose_conv_weight", "plan_layer",
           "mac_fraction", "conv_aliases", "PointwiseConv2d", "PointwiseConv3d", "gemm_pointwise_"]
