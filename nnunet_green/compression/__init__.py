"""Tucker-2 compression of nnU-Net convolutions (see docs/compression.md).

    from nnunet_green.compression import TuckerConfig, UniformRanks, BudgetedRanks, tucker_
    records = tucker_(network, TuckerConfig(rank_ratio=0.12))           # or tucker_(network, UniformRanks(0.12))
    records = tucker_(network, BudgetedRanks(0.12, cost="macs"), input_shape=(1, 1, 128, 128, 128))
    stats = collect_statistics(network, patches)                         # data-aware: calibration images
    records = tucker_(network, TuckerConfig(rank_ratio=0.12), calibration=stats)
    records = tucker_(network, TuckerConfig(speed_rule="measured"), input_shape=(1, 1, 128, 128, 128))  # timed
"""
from .api import (LayerRecord, TuckerConfig, apply_plan_, apply_ranks_, factorize_structure_, plan_layer, ranks_of,
                  tucker_)
from .calibration import CalibrationError, CalibrationStats, collect_statistics
from .cost import dense_reason, factorized_params, mac_fraction, param_count
from .decompose import decompose_conv_weight, tucker_ranks
from .layers import PointwiseConv2d, PointwiseConv3d, TuckerConv, gemm_pointwise_
from .layer_timing import LayerTiming, speed_verdict, time_factorization
from .macs import count_macs, executed_params, input_shapes, mac_breakdown
from .policies import BudgetedRanks, CalibratedRanks, GivenRanks, MeasuredSpeed, RankPlan, RankPolicy, UniformRanks
from .surgery import conv_aliases

__all__ = ["TuckerConfig", "tucker_", "UniformRanks", "BudgetedRanks", "GivenRanks", "RankPolicy", "RankPlan",
           "apply_plan_", "apply_ranks_", "TuckerConv", "LayerRecord", "count_macs", "factorize_structure_",
           "mac_breakdown", "executed_params", "ranks_of", "tucker_ranks", "decompose_conv_weight", "plan_layer",
           "mac_fraction", "factorized_params", "param_count", "dense_reason", "conv_aliases", "PointwiseConv2d",
           "PointwiseConv3d", "gemm_pointwise_", "CalibratedRanks", "CalibrationStats", "CalibrationError",
           "collect_statistics", "MeasuredSpeed", "LayerTiming", "speed_verdict", "time_factorization",
           "input_shapes"]
