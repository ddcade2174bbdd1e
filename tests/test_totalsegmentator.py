"""Drop-in test with the REAL TotalSegmentator CLI: a TotalSegmentator-shaped weights root (the `--fast` 3 mm model,
Dataset297, old-format plans as TS v2 ships them) is compressed with `nnunet-green-compress` in weights-root mode,
and `TotalSegmentator --fast` runs on the real example CT with TOTALSEG_WEIGHTS_PATH pointing at the result.

The real Dataset297 weights (~165 MB, a download) are not available offline, so the checkpoint holds random weights
of a smaller PlainConvUNet (fewer features/stages, same format and 118 outputs) to keep the CPU time low.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import TOTALSEG_EXAMPLE, requires, run_cli

pytest.importorskip("totalsegmentator")

TASK_FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj"
MODEL_FOLDER = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
CT = TOTALSEG_EXAMPLE / "example_ct_sm.nii.gz"


def ts_old_format_plans(base_features=8, max_features=32, n_stages=3, patch=(32, 64, 64)) -> dict:
    """nnU-Net <= 2.1 plans as TotalSegmentator v2 ships them (no `architecture`; UNet_* keys)."""
    conf = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [160.0, 119.0, 119.0], "spacing": [3.0, 3.0, 3.0],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": base_features,
        "n_conv_per_stage_encoder": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "num_pool_per_axis": [n_stages - 1] * 3,
        "pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
        "conv_kernel_sizes": [[3, 3, 3]] * n_stages, "unet_max_num_features": max_features,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
    }
    return {
        "dataset_name": TASK_FOLDER, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 3.0, 3.0],
        "original_median_shape_after_transp": [160, 119, 119], "image_reader_writer": "NibabelIOWithReorient",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": conf},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 102.5, "median": 80.0, "min": -1024.0, "percentile_00_5": -958.0,
            "percentile_99_5": 1481.0, "std": 268.6}},
    }


def ts_dataset_json() -> dict:
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0, **{name: int(i) for i, name in class_map["total"].items()}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz"}


@torch.no_grad()
def project_to_low_rank_(net, rank):
    """Give every spatial conv/transposed-conv kernel multilinear rank <= (rank, rank) in its two channel modes, so a
    Tucker-2 factorization with ranks >= `rank` is exact and dense and compressed models must agree (random weights
    otherwise make argmax over 118 classes hypersensitive to any approximation)."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight[0, 0].numel() > 1:
            w = m.weight.double()
            for mode in (0, 1):
                unfolded = w.movedim(mode, 0).flatten(1)
                u = torch.linalg.svd(unfolded, full_matrices=False)[0][:, :rank]
                w = torch.tensordot(u @ u.T, w.movedim(mode, 0), dims=1).movedim(0, mode)
            m.weight.copy_(w.float())


def build_ts_weights_root(root, seed=0, low_rank=8):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = ts_old_format_plans(), ts_dataset_json()
    folder = root / TASK_FOLDER / MODEL_FOLDER
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-format notice
        cm = PlansManager(json.loads(json.dumps(plans))).get_configuration("3d_fullres")
    torch.manual_seed(seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, len(dataset["labels"]),
                                 deep_supervision=False)
    if low_rank:
        project_to_low_rank_(net, low_rank)
    torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 4000,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": "cpu"},
                "trainer_name": "nnUNetTrainer_4000epochs_NoMirroring", "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    return root


def run_totalsegmentator(weights, home, out_file):
    home.mkdir(parents=True, exist_ok=True)
    # offline: TS reads these keys from config.json; without send_usage_stats=false it posts usage statistics
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_nnunet_green_test",
                                                  "send_usage_stats": False, "prediction_counter": 0,
                                                  "statistics_disclaimer_shown": True}))
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), TOTALSEG_WEIGHTS_PATH=str(weights), OMP_NUM_THREADS="2",
               nnUNet_compile="f")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        env.pop(k, None)
    return run_cli("TotalSegmentator", "-i", CT, "-o", out_file, "--fast", "--ml", "-d", "cpu", "-nr", 1, "-ns", 1,
                   env=env, timeout=600)


@requires(TOTALSEG_EXAMPLE)
def test_totalsegmentator_runs_compressed_weights_root(tmp_path):
    import nibabel as nib

    dense_root = build_ts_weights_root(tmp_path / "ts_weights")
    out_root = tmp_path / "ts_weights_compressed"
    proc = run_cli("nnunet-green-compress", "-i", dense_root, "-o", out_root, "--rank-ratio", 0.25, "-q")
    assert "params" in proc.stdout

    folder = out_root / TASK_FOLDER / MODEL_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["compression.json", "dataset.json", "fold_0", "plans.json"]
    conf = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert "UNet_class_name" not in conf  # written in the new format
    kw = conf["architecture"]["arch_kwargs"]
    assert kw["dense_network_class"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    assert kw["features_per_stage"] == [8, 16, 32] and kw["n_conv_per_stage"] == [2, 2, 2]
    assert kw["tucker_ranks"]
    manifest = json.loads((folder / "compression.json").read_text())
    assert manifest["configuration"] == "3d_fullres" and manifest["patch_size"] == [32, 64, 64]
    assert manifest["totals"]["params_after"] < manifest["totals"]["params_before"]
    factorized = [lay for lay in manifest["layers"] if lay["factorized"]]
    assert factorized and all(lay["rank_in"] >= min(8, lay["in_channels"]) and
                              lay["rank_out"] >= min(8, lay["out_channels"]) for lay in factorized)
    assert max(lay["rel_error"] for lay in factorized) < 1e-3
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer_4000epochs_NoMirroring"

    home = tmp_path / "ts_home"
    seg_c = tmp_path / "seg_compressed.nii.gz"
    proc = run_totalsegmentator(out_root, home, seg_c)
    log = proc.stdout + proc.stderr
    assert "Downloading" not in log, log[-2000:]
    assert sorted(p.name for p in out_root.iterdir()) == [TASK_FOLDER], "TotalSegmentator added weights"
    ct = nib.load(CT)
    seg = nib.load(seg_c)
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, ct.affine, atol=1e-3)
    labels_c = np.asarray(seg.dataobj)
    assert labels_c.max() <= 117 and len(np.unique(labels_c)) > 1

    # the dense root through the same CLI, for comparison: the same labels come out for most voxels
    seg_d = tmp_path / "seg_dense.nii.gz"
    run_totalsegmentator(dense_root, home, seg_d)
    labels_d = np.asarray(nib.load(seg_d).dataobj)
    agreement = float((labels_c == labels_d).mean())
    print(f"TotalSegmentator --fast voxel agreement dense vs compressed(0.25): {agreement:.4f}")
    # every spatial kernel has multilinear rank <= 8 and the ranks chosen are >= 8: the factorization is exact
    assert agreement > 0.99
    shutil.rmtree(home)
