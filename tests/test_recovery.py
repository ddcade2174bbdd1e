"""Accuracy recovery of compressed models on a real Hippocampus model trained by the real nnUNetv2_train:
label-free distillation (held-out error must drop), the fine-tune trainer through the stock nnUNetv2_train and
nnUNetv2_predict, budgeted rank selection vs the uniform ratio, and the bad-input errors."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_compress_refuses, predict_in_process, run_cli

FINETUNE = "nnUNetTrainerTuckerFinetune"
TUCKER_NETWORK = "nnunet_green.compression.network.TuckerFactorizedNetwork"


@pytest.fixture(scope="module")
def compressed(trained_fp32, tmp_path_factory) -> Path:
    """The trained model compressed at rank ratio 0.12 (88 % of the factorized layers' parameters removed)."""
    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.model_folder import compress_model_folder

    out = tmp_path_factory.mktemp("recovery") / "compressed"
    compress_model_folder(trained_fp32.parent, out, TuckerConfig(rank_ratio=0.12), speed_check=False)
    return out


def _center_patch(hippocampus, model, case_files) -> torch.Tensor:
    """One patch of an image preprocessed by nnU-Net's own preprocessor (as the predictor does), centre crop/pad."""
    with contextlib.redirect_stdout(io.StringIO()):
        data, _, _ = model.configuration_manager.preprocessor_class(verbose=False).run_case(
            case_files, None, model.plans_manager, model.configuration_manager, model.dataset_json)
    patch = list(model.configuration_manager.patch_size)
    out = np.zeros((data.shape[0], *patch), dtype=np.float32)
    src, dst = [], []
    for s, p in zip(data.shape[1:], patch):
        n = min(s, p)
        a, b = (s - n) // 2, (p - n) // 2
        src.append(slice(a, a + n))
        dst.append(slice(b, b + n))
    out[(slice(None), *dst)] = data[(slice(None), *src)]
    return torch.from_numpy(out)[None]


@torch.no_grad()
def _rel_error(student, teacher, x) -> float:
    t, s = teacher.network.eval()(x), student.network.eval()(x)
    return float((s - t).norm() / t.norm())


# ------------------------------------------------------------------------------------------------------------------
# 1. label-free distillation
# ------------------------------------------------------------------------------------------------------------------

def test_distillation_reduces_heldout_error(hippocampus, compressed, tmp_path):
    from nnunet_green.contract import BenchResult, CompressionManifest
    from nnunet_green.evaluation.bench import bench
    from nnunet_green.nnunet_io import ModelFolder
    from nnunet_green.recovery import distill_model_folder

    folder = tmp_path / "student"
    shutil.copytree(compressed, folder)
    teacher_folder = Path(json.loads((folder / "compression.json").read_text())["source"]["path"])
    ck = folder / "fold_0" / "checkpoint_final.pth"
    ck_before = ck.read_bytes()

    # an independent held-out check: a test image that is NOT in the distillation folder
    test_case = sorted(hippocampus.test_images.glob("*_0000.nii.gz"))[0]
    teacher = ModelFolder(teacher_folder).load("0")
    x = _center_patch(hippocampus, teacher, [str(test_case)])
    err_before = _rel_error(ModelFolder(folder).load("0"), teacher, x)

    train_images = hippocampus.raw / "Dataset004_Hippocampus" / "imagesTr"
    rec = distill_model_folder(folder, train_images, steps=3, lr=1e-3, batch_size=1, patches_per_image=2,
                               heldout_patches=2, seed=0, progress=False)

    # the function's own held-out measurement (images it did not train on)
    assert rec["heldout"] == "images" and len(rec["heldout_images"]) == 1 and rec["train_images"] == 5
    assert rec["steps_done"] == 3 and rec["nonfinite_steps"] == 0
    assert rec["heldout_rel_error_after"] < rec["heldout_rel_error_before"]
    assert rec["loss_after"] < rec["loss_before"]
    # the saved checkpoint, loaded the way the stock predictor loads it, is closer to the teacher on a new image
    err_after = _rel_error(ModelFolder(folder).load("0"), teacher, x)
    assert err_after < err_before, (err_before, err_after)

    # recorded in compression.json; checkpoint replaced atomically, trainer name/init args kept
    manifest = json.loads((folder / "compression.json").read_text())
    assert manifest["recovery"]["method"] == "distillation" and manifest["recovery"]["kind"] == "distilled"
    assert manifest["recovery"]["steps"] == 3 and manifest["recovery"]["images"] == 6
    assert manifest["recovery"]["nonfinite_steps"] == 0 and manifest["recovery"]["steps_done"] == 3
    assert manifest["recovery"]["device"] == "cpu" and manifest["recovery"]["seconds"] > 0
    assert CompressionManifest.read(folder / "compression.json").rule_label == "ratio 0.12 + distilled"

    # bench rows label the models: dense reference, then the distilled ratio-0.12 model with its kept fraction
    out = tmp_path / "bench"
    b = bench([teacher_folder, folder], out, repeats=1, warmup=0, log=lambda msg: None)
    assert BenchResult.read(out / "bench.json").models == b["models"]
    assert [m["rule"] for m in b["models"]] == ["dense", "ratio 0.12 + distilled"]
    assert [m["rank_ratio"] for m in b["models"]] == [None, 0.12]
    dense_row, distilled_row = b["models"]
    assert dense_row["kept_fraction"] == 1.0
    assert distilled_row["kept_fraction"] == pytest.approx(distilled_row["params"] / dense_row["params"], rel=0.02)
    assert ck.read_bytes() != ck_before
    new, old = torch.load(ck, weights_only=False), torch.load(compressed / "fold_0" / "checkpoint_final.pth",
                                                            weights_only=False)
    assert new["trainer_name"] == old["trainer_name"] and new["init_args"] == old["init_args"]
    assert set(new["network_weights"]) == set(old["network_weights"])
    assert not [p.name for p in folder.rglob(".*tmp*")]


def test_distillation_keeps_the_starting_weights_when_training_only_hurts(hippocampus, compressed, tmp_path):
    """A far too large lr throws the student away from the teacher; the held-out checks keep the best weights, here
    the decomposition it started from, so the saved model is never worse than the compressed one."""
    from nnunet_green.recovery import distill_model_folder

    folder = tmp_path / "student"
    shutil.copytree(compressed, folder)
    before = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    rec = distill_model_folder(folder, hippocampus.raw / "Dataset004_Hippocampus" / "imagesTr", steps=2, lr=1.0,
                               batch_size=1, patches_per_image=1, heldout_patches=2, eval_every=1, seed=0,
                               progress=False)
    assert rec["steps_done"] == 2 and rec["kept_step"] == 0 and rec["eval_every"] == 1
    assert [h["step"] for h in rec["heldout_history"]] == [0, 1, 2]
    assert all(h["loss"] > rec["heldout_history"][0]["loss"] for h in rec["heldout_history"][1:])
    assert rec["heldout_rel_error_after"] == pytest.approx(rec["heldout_rel_error_before"], rel=1e-5)
    after = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distillation_matching_the_stage_outputs(hippocampus, compressed, tmp_path):
    """feature_weight > 0 adds the output of every encoder and decoder stage to the loss, recorded by forward hooks
    that are gone afterwards; the held-out logit error still drops."""
    from nnunet_green.nnunet_io import ModelFolder
    from nnunet_green.recovery import distill_model_folder
    from nnunet_green.recovery.distill import StageOutputs

    folder = tmp_path / "student"
    shutil.copytree(compressed, folder)
    rec = distill_model_folder(folder, hippocampus.raw / "Dataset004_Hippocampus" / "imagesTr", steps=3, lr=1e-3,
                               batch_size=1, patches_per_image=2, heldout_patches=2, feature_weight=1.0, seed=0,
                               progress=False)
    assert rec["feature_weight"] == 1.0 and rec["steps_done"] == 3 and rec["nonfinite_steps"] == 0
    assert rec["heldout_rel_error_after"] < rec["heldout_rel_error_before"]

    model = ModelFolder(folder).load("0")
    net = model.network.eval()
    tap = StageOutputs(net)
    n_encoder = len([n for n in tap.names if n.startswith("encoder.")])
    assert n_encoder >= 2 and len(tap.names) == 2 * n_encoder - 1  # one decoder stage per skip connection
    with torch.no_grad():
        net(torch.zeros(1, 1, *model.configuration_manager.patch_size))
    assert set(tap.outputs) == set(tap.names)
    tap.close()
    assert not tap.outputs and not any(m._forward_hooks for m in net.modules())


def test_distill_settings_declared_once():
    """The CLI's defaults are DistillSettings' (no second copy), every setting has an option, --help of both CLIs
    documents the exit codes, and bad values are rejected by the one check."""
    import dataclasses

    from nnunet_green.contract import EXIT_CODES_HELP
    from nnunet_green.evaluation.cli import build_parser as bench_parser
    from nnunet_green.recovery import DistillError, DistillSettings
    from nnunet_green.recovery.cli import build_parser, settings_from_args

    parser = build_parser()
    args = parser.parse_args(["FOLDER", "--images", "DIR"])
    assert settings_from_args(args) == DistillSettings()
    assert all(hasattr(args, name) for name in DistillSettings.field_names())
    changed = settings_from_args(parser.parse_args(["F", "--images", "D", "--steps", "7", "--patch-size", "8", "16",
                                                    "16"]))
    assert changed == dataclasses.replace(DistillSettings(), steps=7, patch_size=(8, 16, 16))
    assert EXIT_CODES_HELP in parser.format_help() and EXIT_CODES_HELP in bench_parser().format_help()
    assert "(default 200)" in parser.format_help()
    for bad, message in (({"steps": -1}, "steps"), ({"batch_size": 0}, "batch_size"), ({"loss": "l1"}, "loss"),
                         ({"heldout_fraction": 1.0}, "heldout_fraction"), ({"max_minutes": 0}, "max_minutes"),
                         ({"feature_weight": -1}, "feature_weight")):
        with pytest.raises(DistillError, match=message):
            DistillSettings().replace(**bad).check()
    with pytest.raises(DistillError, match="unknown distillation setting"):
        DistillSettings().replace(step=3)


@pytest.fixture()
def images_like(hippocampus, tmp_path):
    """Build an images folder from the first test image: make(channels=[0, 1]) -> folder."""
    src = sorted(hippocampus.test_images.glob("*_0000.nii.gz"))[0]

    def make(channels):
        d = tmp_path / f"images_{len(channels)}"
        d.mkdir()
        for c in channels:
            shutil.copy(src, d / f"case_{c:04d}.nii.gz")
        return d
    return make


def test_distill_bad_input(trained_fp32, compressed, images_like, tmp_path, capsys):
    from nnunet_green.contract import EXIT_BAD_INPUT
    from nnunet_green.recovery.cli import main
    ok_images = images_like([0])
    empty = tmp_path / "empty"
    empty.mkdir()
    regions = tmp_path / "regions"  # the same folder as if trained on nested regions (sigmoid outputs)
    shutil.copytree(compressed, regions, ignore=shutil.ignore_patterns("*.pth", "*.onnx"))
    ds = json.loads((regions / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "hippocampus": [1, 2], "posterior": 2}
    ds["regions_class_order"] = [1, 2]
    (regions / "dataset.json").write_text(json.dumps(ds))
    cases = {
        "uncompressed": ((trained_fp32.parent, "--images", ok_images), "not a compressed model folder"),
        "empty images": ((compressed, "--images", empty), "no images in"),
        "missing images": ((compressed, "--images", tmp_path / "nope"), "images folder not found"),
        "channels": ((compressed, "--images", images_like([0, 1])), "expects 1 channel"),
        "teacher": ((compressed, "--images", ok_images, "--teacher", tmp_path / "nope"), "teacher (dense) model"),
        "teacher compressed": ((compressed, "--images", ok_images, "--teacher", compressed), "itself a compressed"),
        "patch size": ((compressed, "--images", ok_images, "--patch-size", "30", "30", "30"), "total stride"),
        "settings": ((compressed, "--images", ok_images, "--lr", "-1"), "lr must be a positive number"),
        "missing folder": ((tmp_path / "nope", "--images", ok_images), "model folder not found"),
        "kl on regions": ((regions, "--images", ok_images, "--loss", "kl"), "predicts overlapping regions"),
    }
    before = (compressed / "compression.json").read_text()
    for what, (args, message) in cases.items():
        # in-process main() (the console script's entry point): same messages, no interpreter start-up per case
        code = main([*map(str, args), "--steps", "1", "-q"])
        err = capsys.readouterr().err
        assert code == EXIT_BAD_INPUT == 2, (what, err)
        lines = [line for line in err.strip().splitlines() if line]
        assert lines == [lines[-1]] and lines[-1].startswith("nnunet-green-distill: error:"), (what, err)
        assert message in lines[-1], (what, err)
    assert (compressed / "compression.json").read_text() == before  # nothing written on failure


def test_compress_cli_budget_and_distill_in_one_command(hippocampus, trained_fp32, tmp_path):
    """nnunet-green-compress --rank-budget ... --distill IMAGES: budgeted ranks within the budget, distilled before
    the folder is published, recorded in compression.json, and the stock predictor runs the result."""
    out = tmp_path / "c" / trained_fp32.parent.name
    images = hippocampus.raw / "Dataset004_Hippocampus" / "imagesTr"
    proc = run_cli("nnunet-green-compress", "-i", trained_fp32.parent, "-o", out, "--rank-budget", 0.15,
                   "--distill", images, "--distill-steps", 2, "--calibration-patches", 3, "-q", "--no-speed-check",
                   env=hippocampus.env())
    assert "distilled 2 steps" in proc.stdout
    m = json.loads((out / "compression.json").read_text())
    assert m["config"]["budget"] == 0.15 and m["config"]["budget_cost"] == "params"
    # images at hand: the ranks and factors are calibrated on the distillation images too
    assert m["config"]["rank_ratio"] is None and m["rank_rule"].startswith("calibrated ranks")
    assert m["decomposition"] == "calibrated" and m["calibration"]["source"] == str(images)
    assert m["calibration"]["patches"] == 3
    eligible = [lay for lay in m["layers"] if math.prod(lay["kernel_size"]) > 1
                and min(lay["in_channels"], lay["out_channels"]) >= 8]
    kept = sum(lay["params_after"] for lay in eligible) / sum(lay["params_before"] for lay in eligible)
    assert 0.1 < kept <= 0.15 + 1e-9, kept
    ranks = json.loads((out / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
        "arch_kwargs"]["tucker_ranks"]
    assert ranks == {lay["name"]: [lay["rank_in"], lay["rank_out"]] for lay in m["layers"] if lay["factorized"]}
    rec = m["recovery"]
    assert rec["method"] == "distillation" and rec["steps_done"] == 2 and rec["teacher"] == str(trained_fp32.parent)
    assert rec["kind"] == "distilled" and rec["nonfinite_steps"] == 0
    # the counters this machine has (none here, NVML/RAPL elsewhere), as the green trainers read them
    from nnunet_green.metering import EnergyMeter
    meter = EnergyMeter(torch.device("cpu"))
    assert rec["energy_source"] == meter.source
    meter.close()
    assert (rec["energy_j"] is None) == (rec["energy_source"] == "unavailable")
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    predicted = predict_in_process(out, hippocampus.test_images, tmp_path / "pred")
    assert len(predicted) == len(list(hippocampus.test_images.glob("*_0000.nii.gz")))


def test_compress_cli_recovery_bad_input(trained_fp32, images_like, tmp_path, capsys):
    """Bad rule/distillation arguments: one line, exit 2, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out" / "model"
    cases = [(["--rank-ratio", "0.1", "--rank-budget", "0.1"], "not both"),
             (["--rank-budget", "1.5"], "--rank-budget"),
             (["--distill-steps", "3"], "needs --distill"),
             (["--distill", str(empty)], "no images in"),
             (["--distill", str(images_like([0, 1]))], "expects 1 channel")]
    assert_compress_refuses(trained_fp32.parent, out, cases, capsys)


# ------------------------------------------------------------------------------------------------------------------
# 2. fine-tuning with labels through the stock nnUNetv2_train / nnUNetv2_predict
# ------------------------------------------------------------------------------------------------------------------

def test_finetune_trainer_stock_train_and_predict(hippocampus, compressed, tmp_path):
    fold = hippocampus.train(FINETUNE, fold=0, epochs=1, iters=2, val_iters=1, nnUNet_green_finetune_from=compressed)
    model = fold.parent
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    src_arch = json.loads((compressed / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == TUCKER_NETWORK
    assert arch["arch_kwargs"]["tucker_ranks"] == src_arch["arch_kwargs"]["tucker_ranks"]

    ck = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    start = torch.load(compressed / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert ck["trainer_name"] == FINETUNE
    assert set(ck["network_weights"]) == set(start)  # factorized state dict
    changed = [k for k in start if not torch.equal(start[k], ck["network_weights"][k].to(start[k].dtype))]
    assert changed, "fine-tuning did not change any weight"
    # it started from the compressed weights, not from a fresh init: small relative change after 2 steps
    k = next(k for k in start if k.endswith("core.weight"))
    rel = float((ck["network_weights"][k] - start[k]).norm() / start[k].norm())
    assert rel < 0.2, rel
    from nnunet_green.contract import CompressionManifest

    manifest = CompressionManifest.read(model / "compression.json")
    assert manifest.recovery["method"] == "finetune" and manifest.recovery["kind"] == "fine-tuned"
    assert manifest.recovery["epochs"] == 1 and manifest.folds == ["0"]
    assert manifest.rule_label == "ratio 0.12 + fine-tuned"
    assert (fold / "green_summary.json").is_file()  # metered like the other green trainers
    # the fast CPU path inherited with the source's weights went stale; the trainer rebuilt it for the new weights
    assert manifest.fast_path["status"] == "built" and manifest.fast_path["folds"]["fold_0"]["status"] == "built"

    out = tmp_path / "pred"
    proc = run_cli("nnUNetv2_predict", "-i", hippocampus.test_images, "-o", out, "-d", 4, "-c", "3d_fullres", "-f",
                   0, "-tr", FINETUNE, "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1,
                   env=hippocampus.env())
    assert "fast CPU path: ONNX Runtime" in proc.stderr and "stale" not in proc.stderr, proc.stderr[-2000:]
    preds = sorted(p.name for p in out.glob("*.nii.gz"))
    cases = sorted(p.name.replace("_0000.nii.gz", ".nii.gz") for p in hippocampus.test_images.glob("*_0000.nii.gz"))
    assert preds == cases


def test_finetune_trainer_bad_input(hippocampus, trained_fp32, tmp_path):
    """No env var / an uncompressed folder: nnUNetv2_train stops at init with the trainer's message."""
    from conftest import BIN, DATASET_ID

    for env, message in (({}, "nnUNet_green_finetune_from"),
                         ({"nnUNet_green_finetune_from": trained_fp32.parent}, "not a compressed model folder")):
        proc = subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", FINETUNE,
                               "-device", "cpu"], env=hippocampus.env(**env), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode != 0
        assert "FinetuneError" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------------
# 3. budgeted rank selection
# ------------------------------------------------------------------------------------------------------------------

def _trained_network(trained_fp32):
    from nnunet_green.compression.network import build_network_from_plans

    model = trained_fp32.parent
    net = build_network_from_plans(json.loads((model / "plans.json").read_text()), "3d_fullres",
                                   json.loads((model / "dataset.json").read_text()))
    net.load_state_dict(torch.load(trained_fp32 / "checkpoint_final.pth", weights_only=False)["network_weights"])
    return net.eval()


def test_budgeted_ranks_beat_uniform_at_equal_budget(trained_fp32):
    import copy

    from nnunet_green.compression import TuckerConfig, tucker_
    from nnunet_green.compression import apply_ranks_
    from nnunet_green.compression.rank_selection import select_ranks

    dense = _trained_network(trained_fp32)
    uniform = copy.deepcopy(dense)
    records = tucker_(uniform, TuckerConfig(rank_ratio=0.12))
    sel0 = select_ranks(dense, 0.5)  # only for the list of eligible layers
    eligible = {c.name: c.dense_cost for c in sel0.layers}
    uni = {r.name: r for r in records if r.name in eligible}
    assert uni and all(r.factorized for r in uni.values())
    uniform_cost = sum(r.params_after for r in uni.values())
    budget = uniform_cost / sum(eligible.values())

    sel = select_ranks(dense, budget, cost="params")
    assert sel.selected_cost <= budget * sel.dense_cost * (1 + 1e-9)  # respects the budget
    assert sel.kept_fraction > 0.9 * budget  # and spends it
    assert all(r_in % 8 == 0 and r_out % 8 == 0 for r_in, r_out in sel.ranks.values())

    budgeted = copy.deepcopy(dense)
    errors = apply_ranks_(budgeted, sel.ranks)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(budgeted) <= n_params(uniform) * (1 + 1e-9)

    # total relative squared reconstruction error over the eligible layers (dense layers contribute 0)
    uniform_total = sum(r.rel_error ** 2 for r in uni.values())
    budgeted_total = sum(e ** 2 for e in errors.values())
    assert budgeted_total < uniform_total, (budgeted_total, uniform_total)

    # the budgeted network is a valid network: finite output of the right shape
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(x), budgeted(x)
    assert a.shape == b.shape and torch.isfinite(b).all()


def test_budget_validation(trained_fp32):
    from nnunet_green.compression.rank_selection import select_ranks

    dense = _trained_network(trained_fp32)
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="budget"):
            select_ranks(dense, bad)
    with pytest.raises(ValueError, match="minimum ranks"):
        select_ranks(dense, 1e-4)
    with pytest.raises(ValueError, match="input_shape"):
        select_ranks(dense, 0.2, cost="macs")
    sel = select_ranks(dense, 0.2, cost="macs", input_shape=(1, 1, 40, 56, 40))
    assert sel.selected_cost <= 0.2 * sel.dense_cost * (1 + 1e-9) and not math.isnan(sel.kept_fraction)


# ------------------------------------------------------------------------------------------------------------------
# 4. evaluation helpers shared by nnunet-green-bench and the benchmarks
# ------------------------------------------------------------------------------------------------------------------

def test_interleaved_timing_rotates_the_order():
    from nnunet_green.evaluation import interleaved

    order = []

    def run(name):
        def f():
            order.append(name)
            return float(len(order))
        return f

    times = interleaved({"a": run("a"), "b": run("b"), "c": run("c")}, repeats=3, warmup=1)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {"a": [4.0, 9.0, 11.0], "b": [5.0, 7.0, 12.0], "c": [6.0, 8.0, 10.0]}
    with pytest.raises(ValueError):
        interleaved({"a": run("a")}, repeats=0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_is_resettable_per_measurement():
    from nnunet_green.evaluation import peak_rss_mb, reset_peak_rss, rss_mb

    reset_peak_rss()
    before = rss_mb()
    block = np.ones(200 * 2 ** 20, dtype=np.uint8)  # 200 MB, touched
    peak_with = peak_rss_mb()
    del block
    reset_peak_rss()
    peak_after = peak_rss_mb()
    assert peak_with >= before + 150
    assert peak_after < peak_with - 150  # the peak restarted from the RSS without the block


def test_dice_scores_and_summary():
    from nnunet_green.evaluation import DiceError, dice_scores, foreground_labels, summarize

    pred = np.array([0, 1, 1, 2, 2, 0])
    ref = np.array([0, 1, 2, 2, 2, 0])
    scores = dice_scores(pred, ref, [1, 2, 3])
    assert scores[1] == pytest.approx(2 / 3) and scores[2] == pytest.approx(0.8) and math.isnan(scores[3])
    mean, per_label = summarize({1: [scores[1], 1.0], 2: [scores[2]], 3: [scores[3]]})
    assert per_label == {"1": pytest.approx(5 / 6), "2": pytest.approx(0.8), "3": None}
    assert mean == pytest.approx((5 / 6 + 0.8) / 2)
    with pytest.raises(DiceError, match="shape"):
        dice_scores(pred, ref[:3], [1])
    assert foreground_labels({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}) == [1, 2]


def test_case_means_and_paired_difference():
    from nnunet_green.evaluation import case_means, paired_difference

    nan = math.nan
    assert case_means({1: [0.8, nan, nan], 2: [0.6, 0.9, nan]}) == [pytest.approx(0.7), 0.9, None]
    rng = np.random.default_rng(1)
    a = list(rng.uniform(0.7, 0.9, 40))
    worse = paired_difference(a, [x - 0.02 + rng.normal(0, 0.005) for x in a])
    assert worse["cases"] == 40 and worse["mean"] == pytest.approx(-0.02, abs=0.003)
    assert worse["ci95"][0] < worse["mean"] < worse["ci95"][1] < 0 and worse["worse"] >= 38
    # cases unscored in either model are left out; the interval is seeded, so it repeats
    same = paired_difference(a + [None], a + [0.5])
    assert same == paired_difference(a, a) and same["mean"] == 0 and same["ci95"] == [0, 0] and same["worse"] == 0
    assert paired_difference([0.5, None], [None, 0.5]) is None
