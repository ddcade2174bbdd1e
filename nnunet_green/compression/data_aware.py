"""Data-aware Tucker-2 factors of one conv from calibration statistics (derivation: docs/compression.md).

Per kernel offset o the conv is a matrix W_o (C_out x C_in); the factorized layer computes
y_hat = A sum_o G_o B x_o + c with B (r_in x C_in, `first`), G_o (r_out x r_in, the core), A (C_out x r_out,
`last`). The errors are measured on the layer's outputs, after the following InstanceNorm where there is one
(output channel c weighted by d_c = |gamma_c| / sqrt(var_c + eps)), instead of on the weights:

- input mode: B spans the leading right singular vectors of M^(1/2) S^(1/2) mapped back by S^(-1/2)
  (S: input channel covariance, M = sum_o W_o^T D^2 W_o), and the input is reconstructed from z = B x by the
  linear regression Q = S B^T (B S B^T)^-1;
- output mode: PCA of the D-weighted output covariance: U = leading eigenvectors of D S_y D, A = D^-1 U,
  G_o = U^T D W_o Q;
- bias: the channel means the two projections discard go back into the bias, so the output mean is kept;
- sequential calibration (`drift`): the layer sees the input u that the already compressed layers before it produce
  instead of x; the dense weight is replaced by the ridge regression of the dense response on u,
  W~_o = W_o (C_xu + lam I) (S_u + lam I)^-1 (lam: SEQUENTIAL_CALIBRATION_RIDGE times S_u's mean eigenvalue), and
  the factors are fitted to W~ on u's covariance.

Full rank is exact (B square and invertible, U orthogonal). Everything runs in float64 on C x C matrices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_green.contract import DEFAULT_CALIBRATION_RIDGE, SEQUENTIAL_CALIBRATION_RIDGE

from .calibration import InputDrift, LayerStatistics, Moments
from .cost import TRANSPOSED_CONVS


@dataclass
class LayerSpectra:
    """What one layer's statistics say about its ranks: the input-mode energies (squared singular values of
    M^(1/2) S^(1/2), descending) and output-mode energies (eigenvalues of D S_y D), plus what was regularised."""
    energy_in: torch.Tensor
    energy_out: torch.Tensor
    input_rank_deficient: bool
    weighted_by_norm: bool

    def rel_error(self, r_in: int, r_out: int) -> float:
        """Estimated relative output error at (r_in, r_out): sqrt(1 - kept_in * kept_out), each mode's kept fraction
        of its own energy (1 - f_in f_out: the two projections' losses combined as if independent)."""
        kept = [float(e[:r].sum() / e.sum()) if float(e.sum()) > 0 else 1.0
                for e, r in ((self.energy_in, r_in), (self.energy_out, r_out))]
        return math.sqrt(max(0.0, 1.0 - kept[0] * kept[1]))


def offset_matrices(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(K, C_out, C_in) float64 per-offset matrices of a conv weight (C_out, C_in, *k) or a transposed conv weight
    (C_in, C_out, *k)."""
    w = weight.detach().double()
    if transposed:
        return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 1, 0).contiguous()
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1).contiguous()


def output_weights(stats: LayerStatistics, floor: float = 1e-3) -> torch.Tensor:
    """d_c: how much an error in output channel c counts after the following InstanceNorm (|gamma_c| divided by
    the channel's within-instance std, floored at `floor` x the median so dead channels cannot dominate); ones
    without a norm."""
    c = stats.outputs.second.shape[0]
    norm = stats.norm
    if norm is None:
        return torch.ones(c, dtype=torch.float64)
    var = stats.outputs.covariance(per_instance=True).diagonal().clamp_min(0)
    gamma = norm.weight.detach().double().abs() if getattr(norm, "weight", None) is not None else \
        torch.ones(c, dtype=torch.float64)
    d = gamma / (var + norm.eps).sqrt()
    return d.clamp_min(floor * float(d.median()) + 1e-30)


def _sym_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    e, v = torch.linalg.eigh((m + m.T) / 2)
    return e.flip(0).clamp_min(0), v.flip(1)


def input_covariance(inputs: Moments, per_instance: bool, ridge: float) -> tuple[torch.Tensor, bool]:
    """(regularised input covariance, was it rank-deficient). Per-instance centred when a norm follows (it removes
    each instance's means), else about the global mean; ridge * mean eigenvalue added on the diagonal."""
    s = inputs.covariance(per_instance=per_instance)
    c = s.shape[0]
    e, v = torch.linalg.eigh(s)
    # floor: an (almost) constant input has a zero covariance up to rounding; any basis is then as good
    floor = 1e-12 * float(inputs.second.diagonal().sum()) / max(inputs.voxels * c, 1) + 1e-30
    lam = ridge * max(float(e.clamp_min(0).mean()), floor)
    deficient = bool((e < lam).any()) or inputs.voxels < c
    # eigenvalues below the ridge (rounding can make them slightly negative) are lifted to it
    return (v * e.clamp_min(0).add(lam)) @ v.T, deficient


def spectra(conv: nn.Module, stats: LayerStatistics, ridge: float) -> LayerSpectra:
    wo = offset_matrices(conv.weight, isinstance(conv, TRANSPOSED_CONVS))
    d = output_weights(stats)
    s, deficient = input_covariance(stats.inputs, stats.norm is not None, ridge)
    m = torch.einsum("koi,o,koj->ij", wo, d * d, wo)
    es, vs = _sym_eigh(s)
    sqrt_s = (vs * es.sqrt()) @ vs.T
    e_in, _ = _sym_eigh(sqrt_s @ m @ sqrt_s)
    cov_y = stats.outputs.covariance(per_instance=stats.norm is not None)
    e_out, _ = _sym_eigh(d[:, None] * cov_y * d[None, :])
    return LayerSpectra(e_in, e_out, deficient, stats.norm is not None)


def calibrated_factors(conv: nn.Module, rank_in: int, rank_out: int, stats: LayerStatistics,
                       ridge: float = DEFAULT_CALIBRATION_RIDGE, drift: InputDrift | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(first (r_in, C_in), core weight, last (C_out, r_out), bias (C_out), info) for TuckerConv.set_factors, in the
    conv's dtype. `stats`: the DENSE network's statistics of this conv (`ridge` regularises their input
    covariance); `drift`: what the partly compressed network feeds the conv instead (sequential calibration, with
    its own ridge SEQUENTIAL_CALIBRATION_RIDGE). `info`: estimated relative output error, whether the input
    covariance was regularised."""
    transposed = isinstance(conv, TRANSPOSED_CONVS)
    dense_wo = offset_matrices(conv.weight, transposed)    # (K, C_out, C_in)
    d = output_weights(stats)
    per_instance = stats.norm is not None
    if drift is None:
        wo, mu = dense_wo, stats.inputs.mean
        s, deficient = input_covariance(stats.inputs, per_instance, ridge)
    else:  # ridge regression of the dense response W x on the input u the layer now gets, shrunk towards W:
        # W (C_xu + lam I) (S_u + lam I)^-1, written as W + W (C_xu - S_u) (S_u + lam I)^-1 so that u = x gives W
        # exactly (the regularised S_u also lifts S_u's rounding-negative eigenvalues)
        s, deficient = input_covariance(drift.inputs, per_instance, SEQUENTIAL_CALIBRATION_RIDGE)
        shift = drift.cross.covariance(per_instance) - drift.inputs.covariance(per_instance)
        wo, mu = dense_wo + dense_wo @ torch.linalg.solve(s, shift.T).T, drift.inputs.mean

    # input mode: minimise sum_o E||D W_o (x - Q B x)||^2 = ||M^(1/2) (I - QB) S^(1/2)||_F^2
    m = torch.einsum("koi,o,koj->ij", wo, d * d, wo)
    es, vs = _sym_eigh(s)
    sqrt_s = (vs * es.sqrt()) @ vs.T
    inv_sqrt_s = (vs / es.sqrt()) @ vs.T
    e_in, v_in = _sym_eigh(sqrt_s @ m @ sqrt_s)            # right singular vectors of M^(1/2) S^(1/2)
    b = v_in[:, :rank_in].T @ inv_sqrt_s                   # (r_in, C_in): row space is what matters
    b = torch.linalg.qr(b.T).Q.T                           # orthonormal rows, same row space
    q = s @ b.T @ torch.linalg.inv(b @ s @ b.T)            # best linear reconstruction of x from B x
    wq = wo @ q                                            # (K, C_out, r_in)

    # output mode: PCA of the D-weighted output covariance
    cov_y = stats.outputs.covariance(per_instance=stats.norm is not None)
    e_out, u = _sym_eigh(d[:, None] * cov_y * d[None, :])
    u = u[:, :rank_out]
    a = u / d[:, None]                                     # (C_out, r_out) = D^-1 U
    g = u.T @ (d[:, None] * wq)                            # (K, r_out, r_in) = U^T D W_o Q

    # bias: keep the output mean. A conv output voxel sums all offsets; a transposed conv's output voxel gets
    # K / prod(stride) of them, on average the fraction 1 / prod(stride) of the sum.
    per_voxel = 1.0 / math.prod(conv.stride) if transposed else 1.0
    kept = a @ (g.sum(0) @ (b @ mu))
    bias = None  # without a bias there is nowhere to put the mean (the factors alone are still data-aware)
    if conv.bias is not None:  # the dense layer's mean response, from the factorized layer's input mean
        bias = conv.bias.detach().double() + per_voxel * (dense_wo.sum(0) @ stats.inputs.mean - kept)

    if transposed:  # core weight (r_in, r_out, *k)
        core = g.permute(2, 1, 0).reshape(rank_in, rank_out, *conv.kernel_size)
    else:           # core weight (r_out, r_in, *k)
        core = g.permute(1, 2, 0).reshape(rank_out, rank_in, *conv.kernel_size)
    dtype = conv.weight.dtype
    info = {"est_output_rel_error": LayerSpectra(e_in, e_out, deficient, stats.norm is not None)
            .rel_error(rank_in, rank_out), "input_rank_deficient": deficient,
            "after_norm": stats.norm is not None}
    return (b.to(dtype), core.to(dtype).contiguous(), a.to(dtype).contiguous(),
            None if bias is None else bias.to(dtype), info)


def reconstruction_error(conv: nn.Module, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> float:
    """Relative Frobenius error of the weight the factors stand for (the weight-only decomposition's measure; a
    calibrated factorization trades it for output error)."""
    transposed = isinstance(conv, TRANSPOSED_CONVS)
    b, a = first.double().reshape(first.shape[0], -1), last.double().reshape(last.shape[0], -1)
    g = offset_matrices(core, transposed)                  # (K, r_out, r_in)
    w_hat = a @ g @ b                                      # (K, C_out, C_in)
    w = offset_matrices(conv.weight, transposed)
    return float(torch.linalg.vector_norm(w - w_hat) / torch.linalg.vector_norm(w).clamp_min(1e-30))
