"""TotalSegmentator-shaped model folders, for tests and benchmarks that cannot download the real weights.

The layout, trainer name and old-format plans are those TotalSegmentator v2 ships for its `--fast` 3 mm model
(Dataset297): `<weights>/Dataset297_.../nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/`. The
published architecture is a 5-stage PlainConvUNet [32, 64, 128, 256, 320], patch 112x112x128, 118 outputs
(`DATASET297`); smaller settings keep CPU tests cheap. `DATASET291` + `ts_organs_dataset_json()` describe the 1.5 mm
`total` part model (organs: 6-stage PlainConvUNet [32 .. 320], patch 128^3, 25 outputs) for the CPU benchmarks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from nnunet_green.contract import DATASET_FILE, DEFAULT_CHECKPOINT, DEFAULT_PLANS, PLANS_FILE

TASK_FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj"
ORGANS_TASK_FOLDER = "Dataset291_TotalSegmentator_part1_organs_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
MODEL_FOLDER = f"{TRAINER}__nnUNetPlans__3d_fullres"
DATASET297 = dict(base_features=32, max_features=320, n_stages=5, patch=(112, 112, 128))
DATASET291 = dict(base_features=32, max_features=320, n_stages=6, patch=(128, 128, 128), spacing=1.5)


def ts_old_format_plans(base_features=8, max_features=32, n_stages=3, patch=(32, 64, 64), spacing=3.0) -> dict:
    """nnU-Net <= 2.1 plans as TotalSegmentator v2 ships them (no `architecture`; UNet_* keys)."""
    conf = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [160.0, 119.0, 119.0], "spacing": [spacing] * 3,
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
        "dataset_name": TASK_FOLDER, "plans_name": DEFAULT_PLANS,
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [160, 119, 119], "image_reader_writer": "NibabelIOWithReorient",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": conf},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 102.5, "median": 80.0, "min": -1024.0, "percentile_00_5": -958.0,
            "percentile_99_5": 1481.0, "std": 268.6}},
    }


def ts_dataset_json() -> dict:
    """dataset.json of the `total` task: background + TotalSegmentator's 117 classes (118 outputs)."""
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0, **{name: int(i) for i, name in class_map["total"].items()}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz"}


def ts_organs_dataset_json() -> dict:
    """dataset.json of the 1.5 mm organs part model (Dataset291): background + 24 organs (25 outputs)."""
    from totalsegmentator.map_to_binary import class_map_5_parts

    organs = class_map_5_parts["class_map_part_organs"]
    labels = {"background": 0, **{name: int(i) for i, name in organs.items()}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz"}


def project_to_low_rank_(net, rank: int) -> None:
    """Give every spatial conv/transposed-conv kernel multilinear rank <= (rank, rank) in its two channel modes, so a
    Tucker-2 factorization with ranks >= `rank` is exact and dense and compressed models must agree (random weights
    otherwise make argmax over many classes hypersensitive to any approximation). Projects each mode onto the top
    eigenvectors of its float64 Gram matrix (an SVD of the unfolding can be very slow on 2 threads)."""
    import torch

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight[0, 0].numel() > 1:
                w = m.weight.double()
                for mode in (0, 1):
                    unfolded = w.movedim(mode, 0).flatten(1)
                    u = torch.linalg.eigh(unfolded @ unfolded.T)[1][:, -rank:]
                    w = torch.tensordot(u @ u.T, w.movedim(mode, 0), dims=1).movedim(0, mode)
                m.weight.copy_(w.float())


def build_network(plans: dict, dataset: dict):
    """The network the stock predictor builds from these (old-format) plans for TRAINER, without deep
    supervision (through nnunet_io: the trainer's own builder)."""
    from nnunet_green.nnunet_io import build_network as build, configuration_managers, find_trainer

    pm, cm = configuration_managers(plans, "3d_fullres")
    return build(find_trainer(TRAINER), pm, cm, dataset)


def ts_1_5mm_network(patch=None):
    """The TotalSegmentator 1.5 mm organs network (Dataset291 plans; `patch` overrides its 128^3), random weights,
    as the stock predictor builds it."""
    spec = {**DATASET291, **({} if patch is None else {"patch": tuple(patch)})}
    return build_network(ts_old_format_plans(**spec), ts_organs_dataset_json())


def write_model_folder(root: str | Path, plans: dict, dataset: dict, network_weights: dict,
                       task_folder: str = TASK_FOLDER) -> Path:
    """`root/<task_folder>/<MODEL_FOLDER>/` with plans.json, dataset.json and fold_0/checkpoint_final.pth in
    nnU-Net's checkpoint format; returns the model folder."""
    import torch

    folder = Path(root) / task_folder / MODEL_FOLDER
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / PLANS_FILE).write_text(json.dumps(plans, indent=4))
    (folder / DATASET_FILE).write_text(json.dumps(dataset, indent=4))
    torch.save({"network_weights": network_weights, "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 4000,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": "cpu"},
                "trainer_name": TRAINER, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / DEFAULT_CHECKPOINT)
    return folder


def random_model_folder(root: str | Path, dataset: dict, plans: dict | None = None, network_class: str | None = None,
                        seed: int = 0) -> Path:
    """`write_model_folder` with random weights of the network these plans describe (default: the small
    `ts_old_format_plans()`). `network_class`: dotted name of another network class; the plans are then written in
    the new format (as nnU-Net converts them) with that class."""
    import torch

    from nnunet_green.nnunet_io import build_network as build, configuration_managers, find_trainer

    plans = ts_old_format_plans() if plans is None else plans
    if network_class is not None:
        _, cm = configuration_managers(plans, "3d_fullres")
        conf = json.loads(json.dumps(cm.configuration))
        conf["architecture"]["network_class_name"] = network_class
        plans = {**plans, "configurations": {"3d_fullres": conf}}
    pm, cm = configuration_managers(plans, "3d_fullres")
    torch.manual_seed(seed)
    net = build(find_trainer(TRAINER), pm, cm, dataset)
    return write_model_folder(root, plans, dataset, net.state_dict())


def offline_env(weights: str | Path, home: str | Path) -> dict:
    """Environment for the TotalSegmentator CLI on `weights` that never reaches the network: its config.json in
    `home` turns off usage statistics (otherwise it posts them), and nnU-Net's own folders are unset."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_nnunet_green", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), TOTALSEG_WEIGHTS_PATH=str(weights), nnUNet_compile="f")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        env.pop(k, None)
    return env
