"""Green trainers: found by the stock nnU-Net CLIs, trained for real on Hippocampus, metered, resumable."""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_green.training.optimizers import NNUNET_SGD, SGD_8BIT, optimizer_state_bytes
from nnunet_green.training.precision import AMP, BF16, FP32, HALF
from nnunet_green.training.variants import SETTINGS

from conftest import run_cli

STUDY_SETTINGS = ["nnUNetTrainerGreenFP32", "nnUNetTrainerGreenAMP", "nnUNetTrainerGreenBF16",
                  "nnUNetTrainerGreen8bit", "nnUNetTrainerGreenAMP8bit", "nnUNetTrainerGreenHalf8bit",
                  "nnUNetTrainerGreen8bitAdamW"]


def test_stock_lookup_finds_every_trainer_and_classes_pickle():
    # A fresh interpreter with nnUNet_extTrainer unset: the installed nnunet_green.pth alone must be enough.
    code = (
        "import pickle, sys\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        f"for name in {sorted(SETTINGS)!r}:\n"
        "    cls = find(name)\n"
        "    assert cls.__name__ == name and pickle.loads(pickle.dumps(cls)) is cls, name\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "nnUNet_extTrainer"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_settings_compose_precision_and_optimizer():
    assert SETTINGS["nnUNetTrainerGreenFP32"] == (FP32, NNUNET_SGD)
    assert SETTINGS["nnUNetTrainerGreenAMP8bit"] == (AMP, SGD_8BIT)
    assert SETTINGS["nnUNetTrainerGreenHalf8bit"][0] is HALF
    cls = pickle.loads(pickle.dumps(__import__("nnunet_green.training.variants", fromlist=["x"])
                                    .nnUNetTrainerGreenBF16))
    assert cls.precision is BF16


def test_low_precision_is_dropped_on_cpu_unless_asked_for():
    cpu = torch.device("cpu")
    for policy in (AMP, BF16, HALF):
        assert policy.on(cpu).is_fp32 and not policy.on(cpu).grad_scaler
        assert policy.on(cpu, keep_low_precision_on_cpu=True) == policy
        assert policy.on(torch.device("cuda")) == policy


def test_half_policy_keeps_state_dict_and_returns_fp32_logits():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True))
    keys = list(net.state_dict())
    HALF.apply_(net, torch.device("cpu"))
    assert list(net.state_dict()) == keys
    assert all(p.dtype == torch.float16 for p in net.parameters())
    out = net(torch.randn(1, 1, 8, 8, 8))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _default_3d_fullres_unet():
    # nnU-Net's default 3d_fullres topology (as TotalSegmentator's 1.5 mm models): ~31 M parameters.
    return PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], torch.nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], [2] * 6, 2,
                         [2] * 5, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True})


def test_8bit_sgd_state_is_at_most_03x_of_torch_sgd():
    torch.manual_seed(0)
    net = _default_3d_fullres_unet()
    sizes = {}
    for recipe in (NNUNET_SGD, SGD_8BIT):
        optimizer = recipe.build(net.parameters(), 1e-2, 3e-5)
        for p in net.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        sizes[recipe.name] = optimizer_state_bytes(optimizer)
        del optimizer
    n_params = sum(p.numel() for p in net.parameters())
    assert sizes["SGD"] == n_params * 4  # one fp32 momentum buffer per parameter
    assert sizes["SGD8bit"] <= 0.3 * sizes["SGD"], sizes


def _read_log(fold):
    with open(fold / "green_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("trainer", STUDY_SETTINGS)
def test_stock_nnunetv2_train_runs_each_green_trainer(hippocampus, trainer, request):
    # The fp32 run is the session's shared trained model (same budget), not trained twice.
    fold = request.getfixturevalue("trained_fp32") if trainer == "nnUNetTrainerGreenFP32" \
        else hippocampus.train(trainer, epochs=2, iters=2, val_iters=1)
    assert (fold / "checkpoint_final.pth").is_file()
    rows = _read_log(fold)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        assert float(row["epoch_s"]) > 0 and float(row["train_s"]) > 0
        assert row["energy_source"] == "unavailable"  # no NVML, no RAPL, no CPU power figure on this machine
        assert row["energy_j"] == "" and row["co2eq_g"] == ""  # missing, never 0
        assert float(row["host_rss_peak_mb"]) > 100
        assert float(row["meter_overhead_s"]) < 0.01 * float(row["epoch_s"])
    summary = json.loads((fold / "green_summary.json").read_text())
    precision, recipe = SETTINGS[trainer]
    assert summary["trainer"] == trainer
    assert summary["precision"] == precision.on(torch.device("cpu")).name
    assert summary["optimizer"] == recipe.name
    assert summary["optimizer_state_bytes"] > 0 and summary["num_parameters"] > 1e5
    assert summary["epochs_logged"] == 2 and summary["totals"]["energy_j"] is None
    assert summary["energy"]["gpu"]["available"] is False and summary["energy"]["gpu"]["reason"]
    assert 0 <= summary["dice"]["validation_mean_fg_dice"] <= 1
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    if not precision.is_fp32:
        assert "precision is a GPU feature" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    assert len(checkpoint["logging"]["green_epoch_s"]) == 2


def test_continue_training_resumes_8bit_state_and_appends_the_log(hippocampus):
    trainer = "nnUNetTrainerGreen8bitAdamW"
    fold = hippocampus.train(trainer, fold=1, epochs=1, iters=2, val_iters=1)
    first_epoch_row = _read_log(fold)[0]

    # Load it the way `nnUNetv2_train --c` does and compare the 8-bit state bit for bit.
    code = (
        "import torch, sys\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        f"t = get_trainer_from_args('4', '3d_fullres', 1, '{trainer}', device=torch.device('cpu'))\n"
        f"t.load_checkpoint(r'{fold / 'checkpoint_final.pth'}')\n"
        f"saved = torch.load(r'{fold / 'checkpoint_final.pth'}', map_location='cpu', weights_only=False)"
        "['optimizer_state']['state']\n"
        "now = t.optimizer.state_dict()['state']\n"
        "def same(a, b):\n"
        "    if isinstance(a, dict):\n"
        "        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)\n"
        "    return torch.equal(a, b) if torch.is_tensor(a) else a == b\n"
        "assert saved.keys() == now.keys() and len(now) > 0 and same(saved, now)\n"
        "tensors = lambda d: [v for x in d.values() for v in (tensors(x) if isinstance(x, dict) else [x])]\n"
        "print('identical', sum(torch.is_tensor(v) and v.dtype == torch.uint8 for v in tensors(now)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=hippocampus.env(nnUNet_green_epochs=2),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("identical")[-1]) > 0  # 8-bit (uint8) state tensors were among them

    hippocampus.train(trainer, fold=1, epochs=2, iters=2, val_iters=1, extra_args=["--c"])
    rows = _read_log(fold)
    assert [int(r["epoch"]) for r in rows] == [0, 1] and rows[0] == first_epoch_row
    summary = json.loads((fold / "green_summary.json").read_text())
    assert summary["epochs_logged"] == 2


def test_half_weights_stop_cleanly_when_steps_stay_non_finite(hippocampus):
    # fp16 weights really in use (forced on CPU), one-sample batch to keep the slow CPU fp16 path short.
    code = (
        "import torch\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        "t = get_trainer_from_args('4', '3d_fullres', 2, 'nnUNetTrainerGreenHalf8bit', device=torch.device('cpu'))\n"
        "t.max_consecutive_nonfinite_steps = 3\n"
        "t.initialize()\n"
        "assert all(p.dtype == torch.float16 for p in t.network.parameters())\n"
        "t.dataloader_train, _ = t.get_dataloaders()\n"
        "batch = next(t.dataloader_train)\n"
        "batch = {'data': torch.full_like(batch['data'][:1], float('nan')), 'target': [x[:1] for x in batch['target']]}\n"
        "before = [p.detach().clone() for p in t.network.parameters()]\n"
        "for i in range(2):\n"
        "    t.train_step(batch)\n"
        "assert all(torch.equal(a, b) for a, b in zip(before, t.network.parameters()))\n"
        "try:\n"
        "    t.train_step(batch)\n"
        "except RuntimeError as e:\n"
        "    print('STOPPED', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code],
                          env=hippocampus.env(nnUNet_n_proc_DA=0, nnUNet_green_cpu_low_precision=1),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STOPPED" in proc.stdout and "non-finite" in proc.stdout


def test_stock_predict_uses_a_green_trainer_model(hippocampus, trained_fp32, tmp_path):
    out = tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", hippocampus.test_images, "-o", out, "-d", 4, "-c", "3d_fullres",
            "-tr", "nnUNetTrainerGreenFP32", "-f", 0, "-device", "cpu", "--disable_progress_bar",
            env=hippocampus.env())
    assert len(list(out.glob("*.nii.gz"))) == 2
