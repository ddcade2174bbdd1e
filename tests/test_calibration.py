"""Data-aware (calibrated) Tucker-2 decomposition: output error on held-out inputs vs weight-only factors, exactness
at full rank, calibrated rank allocation, bad calibration input, and one real-CLI run on a Hippocampus model read
by the stock nnUNetv2_predict."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_compress_refuses, predict_in_process, run_cli

from nnunet_green.compression import (CalibratedRanks, CalibrationError, GivenRanks, TuckerConfig, UniformRanks,
                                      collect_statistics, tucker_)
from nnunet_green.compression.sequential import refine_sequentially_


class Block(nn.Module):
    """conv -> InstanceNorm -> LeakyReLU, named like nnU-Net's ConvDropoutNormReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm = nn.InstanceNorm3d(c_out, affine=True)
        self.nonlin = nn.LeakyReLU(0.01)

    def forward(self, x):
        return self.nonlin(self.norm(self.conv(x)))


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(Block(32, 32), nn.Conv3d(32, 24, 3, stride=2, padding=1), nn.ConvTranspose3d(24, 16, 2, 2))
    net[0].norm.weight.data.uniform_(0.5, 1.5)
    return net.eval()


MIX = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))


def _inputs(n: int, seed: int) -> torch.Tensor:
    """32 channels that live (up to 2 % noise) in a 5-dimensional subspace, with an offset: a known low-rank input
    distribution."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, 12, 12, 12, generator=g)
    return torch.einsum("ck,nkxyz->ncxyz", MIX, z) + 0.02 * torch.randn(n, 32, 12, 12, 12, generator=g) + 0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _layer_errors(dense, compressed, x) -> dict[str, float]:
    """Relative output error of each layer of `compressed` vs `dense` on the same (dense) inputs; a Block's after its
    InstanceNorm (what the calibrated objective measures)."""
    errors = {}
    with torch.no_grad():
        h = x
        for i, (d, c) in enumerate(zip(dense, compressed)):
            errors[f"{i}.conv" if isinstance(d, Block) else str(i)] = _rel(c(h), d(h))
            h = d(h)
    return errors


def test_calibrated_factors_beat_weight_only_on_held_out_inputs():
    net = _small_net()
    stats = collect_statistics(net, [_inputs(1, seed) for seed in range(6)])
    assert set(stats.layers) == {"0.conv", "1", "2"} and stats.patches == 6
    assert stats.layers["0.conv"].norm is net[0].norm and stats.layers["1"].norm is None
    plan = {"0.conv": (8, 32), "1": (8, 8), "2": (8, 8)}  # the first layer: only its input mode compressed
    weight_only, calibrated = copy.deepcopy(net), copy.deepcopy(net)
    tucker_(weight_only, GivenRanks(plan))
    records = tucker_(calibrated, GivenRanks(plan), calibration=stats)
    assert {r.decomposition for r in records if r.factorized} == {"calibrated"}

    held_out = _inputs(2, seed=100)
    w_err, c_err = _layer_errors(net, weight_only, held_out), _layer_errors(net, calibrated, held_out)
    # the first layer's input has rank 5 < r_in: calibrated factors keep it almost exactly, weight-only cannot
    assert c_err["0.conv"] < 0.1 < 0.5 < w_err["0.conv"], (c_err, w_err)
    assert all(c_err[k] < w_err[k] for k in w_err), (c_err, w_err)
    with torch.no_grad():
        ref = net(held_out)
        assert _rel(calibrated(held_out), ref) < _rel(weight_only(held_out), ref)
    # the statistics' estimate of the first layer's error is in the right range
    est = next(r.est_output_rel_error for r in records if r.name == "0.conv")
    assert 0 <= est < 0.5


def test_full_rank_stays_exact_with_calibration():
    net = _small_net()
    # one small patch: the 32x32 input covariance of the first conv comes from 8 voxels -> rank-deficient, ridged
    patches = [_inputs(1, 0)[..., :2, :2, :2]]
    stats = collect_statistics(net, patches)
    full = copy.deepcopy(net)
    records = tucker_(full, UniformRanks(1.0), calibration=stats)
    assert all(r.decomposition == "calibrated" for r in records if r.factorized)
    assert any(r.input_rank_deficient for r in records if r.factorized)
    x = _inputs(2, seed=7)
    with torch.no_grad():
        assert _rel(full(x), net(x)) < 1e-5
    # sequential refit: 8 voxels cannot support a regression on 32 (24) channels, so every layer is kept
    record = refine_sequentially_(full, net, patches, stats)
    assert record["layers"] == 0 and record["kept_layers"] == ["0.conv", "1", "2"]
    with torch.no_grad():
        assert _rel(full(x), net(x)) < 1e-5
    # ... and with enough voxels every layer is refitted, still exactly
    patches = [_inputs(1, seed) for seed in range(2)]
    stats = collect_statistics(net, patches)
    full = copy.deepcopy(net)
    tucker_(full, UniformRanks(1.0), calibration=stats)
    record = refine_sequentially_(full, net, patches, stats)
    assert record["layers"] == 3 and not record["kept_layers"]
    assert max(record["input_rel_distance"].values()) < 1e-5
    with torch.no_grad():
        assert _rel(full(x), net(x)) < 1e-5


def test_sequential_refit_lowers_the_network_error():
    """Refitting each layer on the inputs the compressed layers before it produce: the whole network's error on
    held-out inputs drops below the calibrated (dense-input) factors', at the same ranks. (Random weights leave
    little to correct - 0.540 -> 0.524 here; a trained Hippocampus model: docs/results/calibration.md.)"""
    net = _small_net()
    patches = [_inputs(1, seed) for seed in range(6)]
    stats = collect_statistics(net, patches)
    plan = {"0.conv": (4, 32), "1": (16, 16), "2": (16, 16)}  # the first layer loses part of its input: drift
    calibrated = copy.deepcopy(net)
    tucker_(calibrated, GivenRanks(plan), calibration=stats)
    sequential = copy.deepcopy(calibrated)
    record = refine_sequentially_(sequential, net, patches, stats)
    assert list(record["input_rel_distance"]) == ["0.conv", "1", "2"]  # execution order
    assert record["input_rel_distance"]["0.conv"] == 0 < record["input_rel_distance"]["1"]
    held_out = _inputs(2, seed=100)
    with torch.no_grad():
        ref = net(held_out)
        c_err, s_err = _rel(calibrated(held_out), ref), _rel(sequential(held_out), ref)
    assert s_err < c_err - 0.01, (s_err, c_err)


def test_calibrated_ranks_respect_the_budget():
    net = _small_net()
    stats = collect_statistics(net, [_inputs(1, seed) for seed in range(4)])
    policy = CalibratedRanks(0.3, stats)
    plan = policy.plan(net)
    assert plan.ranks and "calibrated ranks" in policy.describe()
    # the first conv's input has rank 5: a calibrated budget gives it the smallest input rank
    assert plan.ranks["0.conv"][0] == 8
    compressed = copy.deepcopy(net)
    records = tucker_(compressed, TuckerConfig(budget=0.3), calibration=stats)
    kept = sum(r.params_after for r in records if r.factorized or r.reason and "budget" in r.reason)
    before = sum(r.params_before for r in records if r.factorized or r.reason and "budget" in r.reason)
    assert kept <= 0.3 * before * (1 + 1e-9)
    with pytest.raises(TypeError):
        CalibratedRanks(0.3, calibration={})


def test_non_finite_statistics_name_the_patch():
    net = _small_net()
    bad = _inputs(1, 0)
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite values on patch 1 of b.nii.gz"):
        collect_statistics(net, [_inputs(1, 1), bad], label=lambda i: f"patch {i} of {['a', 'b'][i]}.nii.gz")


# ------------------------------------------------------------------------------------------------------------------
# real model folders
# ------------------------------------------------------------------------------------------------------------------

def test_compress_cli_calibrate_bad_input(hippocampus, trained_fp32, tmp_path, capsys):
    """Bad calibration images: one line naming the problem (and the file), exit 2, no output folder. (Non-finite
    values in an image do not get this far: nnU-Net's preprocessing makes them finite; non-finite statistics are
    tested in-process above.)"""
    import nibabel as nib

    src = sorted(hippocampus.test_images.glob("*_0000.nii.gz"))[0]
    img = nib.load(src)

    def folder(name, files):
        d = tmp_path / name
        d.mkdir()
        for fname, make in files.items():
            make(d / fname)
        return d

    def save(array):
        return lambda p: nib.save(nib.Nifti1Image(array.astype(np.float32), img.affine), p)

    empty = folder("empty", {})
    unreadable = folder("unreadable", {"case_0000.nii.gz": lambda p: p.write_bytes(b"not a nifti")})
    channels = folder("channels", {"case_0000.nii.gz": lambda p: shutil.copy(src, p),
                                   "case_0001.nii.gz": lambda p: shutil.copy(src, p)})
    flat = folder("flat", {"case_0000.nii.gz": save(np.ones((40, 56), np.float32))})
    tiny = folder("tiny", {"case_0000.nii.gz": save(np.random.rand(4, 4, 4))})
    out = tmp_path / "out" / "model"
    cases = [(["--calibrate", str(tmp_path / "nope")], "images folder not found"),
             (["--calibrate", str(empty)], "no images in"),
             (["--calibrate", str(unreadable)], "unreadable/case_0000.nii.gz"),
             (["--calibrate", str(channels)], "expects 1 channel"),
             (["--calibrate", str(flat)], "flat/case_0000.nii.gz is not a 3D image"),
             (["--calibrate", str(tiny)], "tiny/case_0000.nii.gz has 64 voxels"),
             (["--calibrate", str(empty), "--weight-only"], "not both"),
             (["--calibration-patches", "4"], "needs --calibrate"),
             (["--calibration-sequential"], "needs --calibrate"),
             (["--calibrate", str(channels), "--calibration-patches", "0"], "positive integer")]
    assert_compress_refuses(trained_fp32.parent, out, cases, capsys)


def test_compress_cli_calibrate_real_model_stock_predict(hippocampus, trained_fp32, tmp_path):
    """nnunet-green-compress --calibrate --calibration-sequential on real Hippocampus images: compression.json records
    the calibration and the sequential refit, the stock predictor class runs the folder, and on the held-out cases it
    agrees with the dense model better than the weight-only decomposition at the same ranks, as does the plain
    calibrated one (each held-out image fits one patch: one forward is what the predictor computes)."""
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.evaluation.dice import dice_scores
    from nnunet_green.nnunet_io import ModelFolder
    from nnunet_green.recovery.patches import check_images, preprocess_case

    dense_folder = trained_fp32.parent
    images = hippocampus.raw / "Dataset004_Hippocampus" / "imagesTr"
    calibrated = tmp_path / "calibrated"
    proc = run_cli("nnunet-green-compress", "-i", dense_folder, "-o", calibrated, "--rank-ratio", 0.12,
                   "--calibrate", images, "--calibration-patches", 6, "--calibration-sequential", "-q",
                   "--no-speed-check", env=hippocampus.env())
    assert ("data-aware decomposition: 6 calibration patches of 6 images, layers refitted sequentially"
            in proc.stdout)
    m = json.loads((calibrated / "compression.json").read_text())
    assert m["decomposition"] == "calibrated" and m["rank_rule"].endswith("data-aware factors from 6 calibration "
                                                                          "patches")
    cal = m["calibration"]
    assert cal["images"] == 6 and cal["patches"] == 6 and cal["source"] == str(images)
    assert cal["patch_size"] == m["patch_size"] and cal["statistics_s"] > 0 and cal["process_peak_rss_mb"] > 0
    factorized = [lay for lay in m["layers"] if lay["factorized"]]
    assert factorized and all(lay["decomposition"] == "calibrated" and 0 <= lay["est_output_rel_error"] <= 1
                              for lay in factorized)
    refit = cal["sequential_refit"]
    assert cal["sequential"] is True and refit["seconds"] > 0
    assert refit["layers"] + len(refit["kept_layers"]) == len(factorized) == len(refit["input_rel_distance"])
    plain = tmp_path / "plain"
    p = compress_model_folder(dense_folder, plain, m_config(m), fast_path=False, speed_check=False,
                              calibrate={"images": images, "patches": 6})
    assert p["calibration"]["sequential"] is False and "sequential_refit" not in p["calibration"]
    weight_only = tmp_path / "weight_only"
    w = compress_model_folder(dense_folder, weight_only, m_config(m), fast_path=False, speed_check=False)
    assert w["decomposition"] == "weight-only" and w["calibration"] is None

    predicted = predict_in_process(calibrated, hippocampus.test_images, tmp_path / "pred")
    assert len(predicted) == len(list(hippocampus.test_images.glob("*_0000.nii.gz")))

    dense = ModelFolder(dense_folder).load("0")
    nets = {name: ModelFolder(folder).load("0").network.eval() for name, folder in
            (("sequential", calibrated), ("calibrated", plain), ("weight-only", weight_only))}
    agreement = {name: [] for name in nets}
    with torch.no_grad():
        for _, files in check_images(hippocampus.test_images, dense.dataset_json):
            x = torch.from_numpy(preprocess_case(dense, files))[None]
            x = x[(..., *[slice(0, p) for p in dense.configuration_manager.patch_size])]  # one window
            ref = dense.network.eval()(x).argmax(1).numpy()
            for name, net in nets.items():
                scores = dice_scores(net(x).argmax(1).numpy(), ref, labels=range(3))
                agreement[name].append(np.nanmean(list(scores.values())))
    mean = {name: float(np.mean(v)) for name, v in agreement.items()}
    assert min(mean["sequential"], mean["calibrated"]) > mean["weight-only"], mean


def m_config(manifest: dict) -> TuckerConfig:
    c = manifest["config"]
    return TuckerConfig(rank_ratio=c["rank_ratio"], min_rank=c["min_rank"], round_to=c["round_to"])
