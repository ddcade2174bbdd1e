"""Rank rule and Tucker-2 decomposition of conv weights (tensorly partial_tucker on the two channel modes)."""
from __future__ import annotations

import contextlib
import math

import torch


def scale_for_ratio(c_in: int, c_out: int, kernel_numel: int, rank_ratio: float) -> float:
    """Channel fraction a with a^2*C_in*C_out*K + a*(C_in^2 + C_out^2) = r*C_in*C_out*K (unrounded ranks a*C)."""
    if rank_ratio >= 1.0:
        return 1.0
    quad = c_in * c_out * kernel_numel
    lin = c_in ** 2 + c_out ** 2
    rhs = rank_ratio * quad
    return (-lin + math.sqrt(lin * lin + 4.0 * quad * rhs)) / (2.0 * quad)


def round_rank(x: float, channels: int, min_rank: int, round_to: int) -> int:
    """Nearest multiple of round_to (at least one multiple) when channels >= round_to, else ceil; then clamp to
    [min_rank, channels]."""
    if round_to > 1 and channels >= round_to:
        r = max(round_to, int(math.floor(x / round_to + 0.5)) * round_to)
    else:
        r = int(math.ceil(x - 1e-9))
    return max(1, min(max(r, min_rank), channels))


def tucker_ranks(c_in: int, c_out: int, kernel_numel: int, rank_ratio: float, min_rank: int = 8,
                 round_to: int = 8) -> tuple[int, int]:
    """(r_in, r_out) for keeping `rank_ratio` of the weight parameters; 1.0 means full rank.

    A mode's rank can never exceed the product of the other dimensions (e.g. a 1->32 3x3x3 stem has output rank
    <= 27), so both ranks are capped there: full rank then stays exact instead of asking for factors that don't exist.
    """
    if rank_ratio >= 1.0:
        r_in, r_out = c_in, c_out
    else:
        a = scale_for_ratio(c_in, c_out, kernel_numel, rank_ratio)
        r_in, r_out = round_rank(a * c_in, c_in, min_rank, round_to), round_rank(a * c_out, c_out, min_rank, round_to)
    return min(r_in, c_out * kernel_numel), min(r_out, c_in * kernel_numel)


@contextlib.contextmanager
def one_thread():
    """Decompose on one intra-op thread: the small Gram/eigh/matmul calls gain nothing from two threads, and on a
    busy 2-core machine OpenMP spin-waiting made a whole-network decomposition 3-5x slower (3.3 s -> 11-17 s)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def gram_svd(matrix, n_eigenvecs=None, **kwargs):
    """Truncated SVD of a (short x long) matrix from the eigendecomposition of its small Gram matrix.

    Passed to tensorly as its `svd` callable. Why: LAPACK SVD of a 320 x 8640 float32 unfolding took 2.5-10 s on
    the shared 2-core machines (and tensorly 0.10's `symeig_svd` eigendecomposes the *large* Gram matrix), while
    eigh of the 320 x 320 Gram matrix takes ~0.05 s. Only U (the factor) matters for Tucker; its columns are
    orthonormal by construction, so full-rank factorizations stay exact.
    """
    m = torch.as_tensor(matrix)
    dtype = m.dtype
    if m.shape[0] <= m.shape[1]:
        gram = (m @ m.T).double()  # product in the input dtype (fast), eigh in float64 (tiny)
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0), evecs.flip(1)
        k = min(n_eigenvecs or m.shape[0], m.shape[0])
        u = evecs[:, :k].to(dtype)
        s = evals[:k].clamp_min(0).sqrt().to(dtype)
        v = (u.T @ m) / s.clamp_min(torch.finfo(dtype).tiny)[:, None]
        return u, s, v
    u, s, v = torch.linalg.svd(m, full_matrices=False)  # tall matrix: rare here, plain SVD
    k = n_eigenvecs or s.shape[0]
    return u[:, :k], s[:k], v[:k]


def _unpack_partial_tucker(result):
    """tensorly >= 0.8 returns ((core, factors), errors); 0.7 and earlier returned (core, factors)."""
    first = result[0]
    if isinstance(first, (tuple, list)) or hasattr(first, "factors"):
        core, factors = first
    else:
        core, factors = result
    return core, list(factors)


def _leading_eigvecs(unfolded: torch.Tensor, rank: int) -> torch.Tensor:
    return gram_svd(unfolded, n_eigenvecs=rank)[0]


def tucker2(weight: torch.Tensor, rank_modes: tuple[int, int], n_iter_max: int = 2):
    """Tucker-2 of `weight` on modes (0, 1): weight ~= core x_0 U0 x_1 U1.

    HOSVD init via tensorly `partial_tucker(init='svd', svd=gram_svd)`; then `n_iter_max` HOOI sweeps (each factor
    = leading eigenvectors of the weight projected on the other factor) with tensorly's `multi_mode_dot`.
    tensorly's own HOOI loop is not used because it calls its default (slow here) SVD whatever `svd=` says.
    Returns (core, U0, U1, rel_error) in the weight's dtype; the decomposition itself runs in float32.
    """
    import tensorly as tl  # imported here: keeps `import nnunet_green.compression` light
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import multi_mode_dot

    w = weight.detach().to(torch.float32).contiguous()
    r0, r1 = rank_modes
    with tl.backend_context("pytorch"):
        core, factors = _unpack_partial_tucker(
            partial_tucker(w, rank=[r0, r1], modes=[0, 1], n_iter_max=0, init="svd", svd=gram_svd))
        for _ in range(n_iter_max):
            for idx in (0, 1):
                proj = multi_mode_dot(w, factors, modes=[0, 1], skip=idx, transpose=True)
                factors[idx] = _leading_eigvecs(tl.unfold(proj, idx), (r0, r1)[idx])
            core = multi_mode_dot(w, factors, modes=[0, 1], transpose=True)
        recon = multi_mode_dot(core, factors, modes=[0, 1])
    rel_error = float(torch.linalg.vector_norm(w - recon) / torch.linalg.vector_norm(w).clamp_min(1e-30))
    u0, u1 = factors
    return core.to(weight.dtype), u0.to(weight.dtype), u1.to(weight.dtype), rel_error


def decompose_conv_weight(weight: torch.Tensor, rank_in: int, rank_out: int, transposed: bool,
                          n_iter_max: int = 2):
    """Factors for TuckerConv.set_factors: (first (r_in, C_in), core weight, last (C_out, r_out), rel_error).

    Conv weight is (C_out, C_in, *k); ConvTranspose weight is (C_in, C_out, *k) and its core keeps that layout.
    """
    if transposed:
        core, u_in, u_out, err = tucker2(weight, (rank_in, rank_out), n_iter_max)
    else:
        core, u_out, u_in, err = tucker2(weight, (rank_out, rank_in), n_iter_max)
    return u_in.T.contiguous(), core.contiguous(), u_out.contiguous(), err
