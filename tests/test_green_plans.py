"""nnUNetPlannerGreenLight + nnunet-green-plan, and nnunet-green-loader, on the real Hippocampus fixture with the
real nnU-Net CLIs (plan -> nnUNetv2_preprocess -> nnUNetv2_train -> nnUNetv2_predict)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATASET_ID, run_cli
from nnunet_green.contract import EXIT_BAD_INPUT

LIGHT = "nnUNetPlansGreenLight"
DATASET = "Dataset004_Hippocampus"
TRAINER = "nnUNetTrainerGreenFP32"


def run_module(module: str, *args, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """One of our CLIs via `python -m` (their console scripts are installed only at merge)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def one_clear_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def light_plans(hippocampus) -> dict:
    proc = ok(run_module("nnunet_green.training.plan_cli", "-d", DATASET_ID, "-c", "3d_fullres",
                         env=hippocampus.env()))
    assert "of nnUNetPlans" in proc.stdout and "reuses nnUNetPlans_3d_fullres" in proc.stdout, proc.stdout
    return json.loads((hippocampus.preprocessed / DATASET / f"{LIGHT}.json").read_text())


# --- pure logic ------------------------------------------------------------------------------------------------
def test_light_widths_and_configuration_filter():
    from nnunet_green.training.light_plans import light_features, select_configurations

    assert light_features(6, 16, 256) == (16, 32, 64, 128, 256, 256)
    assert light_features(4, 16, 256) == (16, 32, 64, 128)
    confs = {"2d": {}, "3d_fullres": {}, "3d_lowres": {"next_stage": "3d_cascade_fullres"},
             "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}
    assert sorted(select_configurations(confs, ["3d_fullres"])) == ["3d_fullres"]
    assert "next_stage" not in select_configurations(confs, ["3d_lowres"])["3d_lowres"]
    assert sorted(select_configurations(confs, ["3d_cascade_fullres"])) == ["3d_cascade_fullres", "3d_fullres",
                                                                            "3d_lowres"]


def test_data_is_shared_only_when_preprocessing_is_identical():
    from nnunet_green.training.light_plans import nnUNetPlannerGreenLight

    conf = {"data_identifier": "nnUNetPlansGreenLight_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "r", "resampling_fn_data_kwargs": {"order": 3}, "resampling_fn_seg": "r",
            "resampling_fn_seg_kwargs": {"order": 1}}
    top = {"transpose_forward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
           "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    reference = {**top, "configurations": {"3d_fullres": {**conf, "data_identifier": "nnUNetPlans_3d_fullres"}}}

    def shared(plans_conf, share=True, ref=reference):
        planner = object.__new__(nnUNetPlannerGreenLight)  # no dataset needed for this check
        planner.share_data, planner.reference_plans = share, lambda: ref
        plans = {**top, "configurations": {"3d_fullres": dict(plans_conf)}}
        return planner._share_identical_data(plans), plans["configurations"]["3d_fullres"]["data_identifier"]

    assert shared(conf) == ({"3d_fullres": "nnUNetPlans_3d_fullres"}, "nnUNetPlans_3d_fullres")
    assert shared({**conf, "spacing": [1.0, 1.0, 1.5]}) == ({}, "nnUNetPlansGreenLight_3d_fullres")
    assert shared(conf, share=False) == ({}, "nnUNetPlansGreenLight_3d_fullres")
    assert shared(conf, ref=None) == ({}, "nnUNetPlansGreenLight_3d_fullres")


def test_loader_verdict_logic():
    from nnunet_green.training.loader import LoaderRow, StepTiming, decide

    def row(n, rate):
        return LoaderRow(n, n, "x", 0.1, 0, 0.0, 5, 1.0, rate, True, False)

    step = StepTiming(0.5, [0.5], 2.0, "cuda", True)  # 2 steps/s -> 2.5 batches/s needed with 1.25x headroom
    bound, rec, text = decide([row(0, 1.0), row(2, 2.6), row(4, 5.0)], step)
    assert (bound, rec) == (False, 2) and text.startswith("not input-bound")
    bound, rec, text = decide([row(0, 1.0), row(1, 1.8)], step)
    assert (bound, rec) == (True, 1) and text.startswith("input-bound")
    # no workers: loading is serial with the step, fine only when it is a small fraction of it
    slow_step = StepTiming(6.0, [6.0], 1 / 6, "cpu", False)
    bound, rec, _ = decide([row(0, 28.0), row(1, 15.0)], slow_step)
    assert (bound, rec) == (False, 0)
    bound, rec, _ = decide([row(0, 1.0), row(1, 15.0)], slow_step)  # 1 s of loading per 6 s step: use a worker
    assert (bound, rec) == (False, 1)


# --- planner on real data ----------------------------------------------------------------------------------------
def test_light_plans_keep_topology_and_share_data(hippocampus, light_plans):
    default = json.loads((hippocampus.preprocessed / DATASET / "nnUNetPlans.json").read_text())
    light, ref = light_plans["configurations"]["3d_fullres"], default["configurations"]["3d_fullres"]
    from nnunet_green.contract import LIGHT_PLANNER
    from nnunet_green.training.light_plans import nnUNetPlannerGreenLight

    assert light_plans["experiment_planner_used"] == LIGHT_PLANNER == nnUNetPlannerGreenLight.__name__
    assert light_plans["nnunet_green_planner"]["class"] == "nnunet_green.training.light_plans.nnUNetPlannerGreenLight"
    assert sorted(light_plans["configurations"]) == ["3d_fullres"]  # -c 3d_fullres
    for key in ("patch_size", "batch_size", "spacing", "normalization_schemes"):
        assert light[key] == ref[key], key
    la, ra = light["architecture"]["arch_kwargs"], ref["architecture"]["arch_kwargs"]
    assert la["n_stages"] == ra["n_stages"] and la["strides"] == ra["strides"]
    assert la["features_per_stage"] == [min(256, 16 * 2 ** i) for i in range(la["n_stages"])]
    assert light["data_identifier"] == ref["data_identifier"] == "nnUNetPlans_3d_fullres"


def test_light_network_is_cheaper(hippocampus, light_plans):
    from nnunet_green.training.light_plans import network_cost

    default = json.loads((hippocampus.preprocessed / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((hippocampus.preprocessed / DATASET / "dataset.json").read_text())
    light = network_cost(light_plans, "3d_fullres", dataset_json)
    ref = network_cost(default, "3d_fullres", dataset_json)
    assert light["patch_size"] == ref["patch_size"]
    assert light["params"] < 0.5 * ref["params"], (light, ref)
    assert light["macs_per_patch"] < 0.5 * ref["macs_per_patch"], (light, ref)


def test_preprocess_train_predict_with_light_plans(hippocampus, light_plans, tmp_path):
    env = hippocampus.env()
    # the light plans share nnUNetPlans' preprocessed data (checked in test_light_plans_keep_topology_and_share_data),
    # so, as docs/light_plans.md says, training starts without another nnUNetv2_preprocess
    run_cli("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-p", LIGHT, "-device", "cpu",
            env=hippocampus.env(nnUNet_green_epochs=1, nnUNet_green_iters=2, nnUNet_green_val_iters=1,
                                nnUNet_n_proc_DA=0))
    model = hippocampus.results / DATASET / f"{TRAINER}__{LIGHT}__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    saved = json.loads((model / "plans.json").read_text())
    assert saved["plans_name"] == LIGHT
    assert saved["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 16

    image = sorted(hippocampus.test_images.glob("*.nii.gz"))[0]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / image.name).symlink_to(image)
    run_cli("nnUNetv2_predict", "-i", inp, "-o", out, "-d", DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", TRAINER,
            "-p", LIGHT, "--disable_tta", "-npp", 1, "-nps", 1, "-device", "cpu", env=env)
    import nibabel as nib
    import numpy as np

    pred = out / image.name.replace("_0000.nii.gz", ".nii.gz")
    assert pred.is_file(), sorted(p.name for p in out.iterdir())
    seg = np.asarray(nib.load(pred).dataobj)
    assert seg.shape == nib.load(image).shape and set(np.unique(seg)) <= {0, 1, 2}


def test_plan_cli_bad_input(hippocampus, tmp_path):
    proc = run_module("nnunet_green.training.plan_cli", "-d", 999, env=hippocampus.env())
    one_clear_error(proc, "999", "not found")
    # a raw dataset without a fingerprint: nothing to plan from
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    (raw / "Dataset005_NoFingerprint").mkdir(parents=True)
    (raw / "Dataset005_NoFingerprint" / "dataset.json").write_text(
        (hippocampus.raw / DATASET / "dataset.json").read_text())
    pre.mkdir()
    proc = run_module("nnunet_green.training.plan_cli", "-d", 5,
                      env=hippocampus.env(nnUNet_raw=raw, nnUNet_preprocessed=pre))
    one_clear_error(proc, "fingerprint", "nnUNetv2_extract_fingerprint -d 5")
    assert not any(pre.rglob("*.json"))
    proc = run_module("nnunet_green.training.plan_cli", "--help", env=hippocampus.env())
    assert proc.returncode == 0 and "nnunet-green-plan" in proc.stdout and "exit status" in proc.stdout


# --- loader ------------------------------------------------------------------------------------------------------
def test_loader_measures_real_loader_and_step(hippocampus, light_plans):
    proc = ok(run_module("nnunet_green.training.loader_cli", "-d", DATASET_ID, "-p", LIGHT, "--procs", 0, 1,
                         "--batches", 3, "--steps", 2, "--max-seconds", 60, "--device", "cpu",
                         env=hippocampus.env()))
    fold = hippocampus.results / DATASET / f"nnUNetTrainer__{LIGHT}__3d_fullres" / "fold_0"
    report = json.loads((fold / "loader.json").read_text())
    assert report["format"] == "nnunet-green-loader/1"
    assert [r["n_proc_DA"] for r in report["rows"]] == [0, 1]
    assert [r["augmenter"] for r in report["rows"]] == ["SingleThreadedAugmenter", "NonDetMultiThreadedAugmenter"]
    assert all(r["batches_per_s"] > 0 and r["timed_batches"] >= 1 for r in report["rows"])
    assert report["step"]["seconds_median"] > 0 and report["step"]["device"] == "cpu"
    assert report["recommended_n_proc_DA"] in (0, 1) and isinstance(report["input_bound"], bool)
    assert "input-bound" in report["verdict"] and report["elapsed_s"] < 60 + 60  # budget + set-up margin
    md = (fold / "loader.md").read_text()
    assert "| nnUNet_n_proc_DA |" in md and "export nnUNet_n_proc_DA=" in md
    assert not list(fold.glob("training_log_*.txt"))  # the trainer's banner log is not left behind
    assert "recommended: nnUNet_n_proc_DA=" in proc.stdout


def test_loader_bad_input(hippocampus, tmp_path):
    env = hippocampus.env()
    proc = run_module("nnunet_green.training.loader_cli", "-d", DATASET_ID, "-c", "2d", "-o", tmp_path, env=env)
    one_clear_error(proc, "not preprocessed", "nnUNetv2_preprocess -d 4 -plans_name nnUNetPlans -c 2d")
    proc = run_module("nnunet_green.training.loader_cli", "-d", DATASET_ID, "-p", "nnUNetPlansNope", env=env)
    one_clear_error(proc, "nnUNetPlansNope")
    assert not any(tmp_path.iterdir())
    proc = run_module("nnunet_green.training.loader_cli", "--help", env=env)
    assert proc.returncode == 0 and "nnUNet_n_proc_DA" in proc.stdout and "exit status" in proc.stdout
