"""Green trainers: found by the stock nnU-Net CLIs, trained for real on Hippocampus, metered, resumable."""
from __future__ import annotations

import copy
import csv
import json
import pickle
import subprocess
import sys

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_green.contract import ENERGY_UNAVAILABLE, GreenSettings, settings_table
from nnunet_green.metering import EnergyMeter
from nnunet_green.training import variants
from nnunet_green.training.green_trainer import nnUNetTrainerGreen
from nnunet_green.training.optimizers import ADAMW_8BIT, NNUNET_SGD, SGD_8BIT, optimizer_state_bytes
from nnunet_green.training.precision import AMP, BF16, FP32, HALF, POLICIES
from nnunet_green.training.variants import GREEN_TRAINERS, SETTINGS

from conftest import REPO

# The study's settings (arXiv 2303.10181) plus bf16, and one 8-bit AdamW: every SGD class and the fp32 AdamW one.
STUDY_SETTINGS = [c.__name__ for c in GREEN_TRAINERS
                  if c.optimizer_recipe is not ADAMW_8BIT or c.precision is FP32]
# Through the whole stock nnUNetv2_train (log, summary, checkpoint, final validation): the fp32 baseline (the
# session's shared model), the flagship AMP + 8-bit SGD (precision falls back on CPU) and 8-bit AdamW. The other
# study settings run the same hooks with other class attributes; they are built by nnU-Net's own
# get_trainer_from_args and take real training steps in test_each_study_setting_trains_in_process.
ADAMW_TRAINER = "nnUNetTrainerGreen8bitAdamW"
CLI_SETTINGS = ["nnUNetTrainerGreenFP32", "nnUNetTrainerGreenAMP8bit", ADAMW_TRAINER]
IN_PROCESS_SETTINGS = [name for name in STUDY_SETTINGS if name not in CLI_SETTINGS]


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
    assert variants.nnUNetTrainerGreenHalf8bitAdamW.optimizer_recipe is ADAMW_8BIT
    cls = pickle.loads(pickle.dumps(variants.nnUNetTrainerGreenBF16))
    assert cls is variants.nnUNetTrainerGreenBF16 and cls.precision is BF16
    assert STUDY_SETTINGS == ["nnUNetTrainerGreenFP32", "nnUNetTrainerGreenAMP", "nnUNetTrainerGreenBF16",
                              "nnUNetTrainerGreen8bit", "nnUNetTrainerGreenAMP8bit", "nnUNetTrainerGreenHalf8bit",
                              "nnUNetTrainerGreen8bitAdamW"]


def test_trainer_classes_are_written_out_and_all_listed():
    # Every class is a plain statement of variants.py (visible to grep and type checkers), listed once, and each
    # (precision, optimizer) pair appears once.
    defined = {name: obj for name, obj in vars(variants).items()
               if isinstance(obj, type) and issubclass(obj, nnUNetTrainerGreen) and obj is not nnUNetTrainerGreen}
    assert set(defined) == set(SETTINGS) and len(GREEN_TRAINERS) == len(SETTINGS) == 9
    source = open(variants.__file__).read()
    for name, cls in defined.items():
        assert f"\nclass {name}(nnUNetTrainerGreen):" in source
        assert cls.__module__ == variants.__name__ and cls.__qualname__ == name
        assert "precision" in vars(cls) and "optimizer_recipe" in vars(cls), name  # both named, none inherited
    assert len(set(SETTINGS.values())) == len(SETTINGS)


def test_docs_carry_the_settings_table():
    assert settings_table() in (REPO / "docs" / "training.md").read_text()


def test_low_precision_is_dropped_on_cpu_unless_asked_for():
    cpu = torch.device("cpu")
    for policy in (AMP, BF16, HALF):
        assert policy.on(cpu).is_fp32 and not policy.on(cpu).grad_scaler
        assert policy.on(cpu, keep_low_precision_on_cpu=True) == policy
        assert policy.on(torch.device("cuda")) == policy


def _small_unet(deep_supervision=True):
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], [1, 1, 1], 3, [1, 1], conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                         deep_supervision=deep_supervision)


def test_half_policy_keeps_state_dict_and_returns_fp32_logits():
    net = _small_unet()
    keys = list(net.state_dict())
    HALF.prepare_(net)
    HALF.prepare_(net)  # idempotent: the hooks are registered once
    assert list(net.state_dict()) == keys
    assert all(p.dtype == torch.float16 for p in net.parameters())
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1
    out = net(torch.randn(1, 1, 16, 16, 16))  # fp32 input, as nnU-Net's loader and predictor give
    assert isinstance(out, list) and len(out) == 2  # deep supervision: one output per decoder stage
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)
    net.decoder.deep_supervision = False
    assert net(torch.randn(1, 1, 16, 16, 16)).dtype == torch.float32
    # A checkpoint written with fp16 weights loads strictly into a fresh fp32 network (what nnUNetv2_predict does).
    fresh = _small_unet()
    fresh.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_deep_copy_of_a_prepared_network_trains_its_own_weights_and_pickles(policy):
    # EMA / teacher-student / SWA code deep-copies the network: the copy must compute with ITS weights.
    cpu = torch.device("cpu")
    net = _small_unet()
    policy.prepare_(net)
    assert "forward" not in vars(net)  # no instance-level forward replacement
    clone = copy.deepcopy(net)
    x = torch.randn(1, 1, 16, 16, 16)
    with policy.autocast(cpu):
        loss = sum(o.float().square().mean() for o in clone(x))
    loss.backward()
    copy_params, original_params = list(clone.parameters()), list(net.parameters())
    assert len(copy_params) == len(original_params) > 20
    assert all(p.grad is not None for p in copy_params)
    assert all(p.grad is None for p in original_params)
    # The copy's weights really are its own: changing them changes its output, not the original's.
    with torch.no_grad():
        reference = [o.clone() for o in net(x)]
        for p in clone.parameters():
            p.add_(0.5)
        assert all(torch.equal(a, b) for a, b in zip(reference, net(x)))
        assert not torch.equal(clone(x)[0], reference[0])
    # The prepared network pickles (DDP, torch.save(model), worker processes) and still computes the same.
    restored = pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        again = restored(x)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(again, reference))
    assert [p.dtype for p in restored.parameters()] == [p.dtype for p in net.parameters()]
    assert all(p.dtype == policy.weight_dtype for p in net.parameters())


def test_real_trainer_network_deep_copies_and_validates_like_nnunet(hippocampus):
    # Built the way nnUNetv2_train builds it; a deep copy of trainer.network gets gradients on ITS parameters, and
    # the green validation_step (policy autocast) computes exactly nnU-Net's online-validation values on CPU.
    code = (
        "import copy, os, pickle, numpy as np, torch\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "from nnunet_green.contract import SettingsError\n"
        "os.environ['nnUNet_green_epochs'] = '0'\n"
        "try:\n"
        "    get_trainer_from_args('4', '3d_fullres', 0, 'nnUNetTrainerGreenFP32', device=torch.device('cpu'))\n"
        "except SettingsError as e:\n"
        "    print('SETTINGS', e)\n"
        "del os.environ['nnUNet_green_epochs']\n"
        "for name in ('nnUNetTrainerGreenFP32', 'nnUNetTrainerGreen8bit'):\n"
        "    t = get_trainer_from_args('4', '3d_fullres', 0, name, device=torch.device('cpu'))\n"
        "    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (1000, 3, 50)\n"
        "    t.initialize()\n"
        "    assert 'forward' not in vars(t.network)\n"
        "    clone = copy.deepcopy(t.network)\n"
        "    out = clone(torch.randn(1, 1, *t.configuration_manager.patch_size))\n"
        "    sum(o.float().mean() for o in out).backward()\n"
        "    n = len(list(clone.parameters()))\n"
        "    got = sum(p.grad is not None for p in clone.parameters())\n"
        "    orig = sum(p.grad is not None for p in t.network.parameters())\n"
        "    pickle.loads(pickle.dumps(t.network))\n"
        "    print('GRADS', name, n, got, orig)\n"
        "t.dataloader_train, t.dataloader_val = t.get_dataloaders()\n"
        "batch = next(t.dataloader_val)\n"
        "t.network.eval()\n"
        "with torch.no_grad():\n"
        "    ours, theirs = t.validation_step(batch), nnUNetTrainer.validation_step(t, batch)\n"
        "assert ours.keys() == theirs.keys(), (ours.keys(), theirs.keys())\n"
        "assert np.allclose(ours['loss'], theirs['loss'], rtol=1e-6, atol=1e-7), (ours['loss'], theirs['loss'])\n"
        "for k in ('tp_hard', 'fp_hard', 'fn_hard'):\n"
        "    assert ours[k].shape == theirs[k].shape == (2,) and np.array_equal(ours[k], theirs[k]), k\n"
        "print('VALIDATION same', ours['tp_hard'], ours['fp_hard'], ours['fn_hard'])\n"
    )
    env = {k: v for k, v in hippocampus.env(nnUNet_n_proc_DA=0, nnUNet_green_iters=3).items()
           if k not in ("nnUNet_green_epochs", "nnUNet_green_val_iters")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A bad value stops the trainer at construction, naming the variable.
    assert "SETTINGS nnUNet_green_epochs must be a positive integer, got '0'" in proc.stdout
    grads = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("GRADS")]
    assert [g[0] for g in grads] == ["nnUNetTrainerGreenFP32", "nnUNetTrainerGreen8bit"]
    for _, n, got, orig in grads:
        assert int(n) > 20 and int(got) == int(n) and int(orig) == 0, grads
    assert "VALIDATION same" in proc.stdout


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


@pytest.fixture(scope="module")
def trained_8bit_adamw(hippocampus):
    """nnUNetTrainerGreen8bitAdamW through the stock CLI, 2 epochs (fold 0); the resume test continues it."""
    return hippocampus.train(ADAMW_TRAINER, epochs=2, iters=2, val_iters=1)


def _cpu_energy_source(nn) -> str:
    meter = EnergyMeter(torch.device("cpu"), settings=GreenSettings.from_env(nn.env()), rapl_poll_s=0)
    return meter.source


def _read_log(fold):
    with open(fold / "green_log.csv") as f:
        return list(csv.DictReader(f))


def test_each_study_setting_trains_in_process(hippocampus):
    # Each trainer not run through the CLI: built as nnUNetv2_train builds it, its optimizer and CPU precision as
    # declared, and real training steps on a real batch move its weights with a finite loss.
    assert IN_PROCESS_SETTINGS == ["nnUNetTrainerGreenAMP", "nnUNetTrainerGreenBF16", "nnUNetTrainerGreen8bit",
                                   "nnUNetTrainerGreenHalf8bit"]
    checks = {name: (type(SETTINGS[name][1].build([torch.nn.Parameter(torch.zeros(1))], 1e-2, 0.0)).__name__,
                     SETTINGS[name][0].on(torch.device("cpu")).name) for name in IN_PROCESS_SETTINGS}
    code = (
        "import numpy as np, torch\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        f"checks = {checks!r}\n"
        "batch = None\n"
        "for name, (optimizer, precision) in checks.items():\n"
        "    t = get_trainer_from_args('4', '3d_fullres', 0, name, device=torch.device('cpu'))\n"
        "    t.initialize()\n"
        "    assert type(t.optimizer).__name__ == optimizer, (name, type(t.optimizer).__name__)\n"
        "    assert t.active_precision.name == precision and t.grad_scaler is None, name\n"
        "    if batch is None:\n"
        "        loader, _ = t.get_dataloaders()\n"
        "        batch = next(loader)\n"
        "    before = [p.detach().clone() for p in t.network.parameters()]\n"
        "    losses = [float(t.train_step(batch)['loss']) for _ in range(2)]\n"
        "    moved = sum(not torch.equal(a, b) for a, b in zip(before, t.network.parameters()))\n"
        "    assert all(np.isfinite(losses)) and moved > 0, (name, losses, moved)\n"
        "    print('STEPPED', name, moved)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=hippocampus.env(nnUNet_n_proc_DA=0),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("STEPPED")] == \
        IN_PROCESS_SETTINGS


@pytest.mark.parametrize("trainer", CLI_SETTINGS)
def test_stock_nnunetv2_train_runs_each_green_trainer(hippocampus, trainer, request):
    # The fp32 run is the session's shared trained model and the 8-bit AdamW run the one the resume test continues
    # (same budget): neither is trained twice.
    shared = {"nnUNetTrainerGreenFP32": "trained_fp32", ADAMW_TRAINER: "trained_8bit_adamw"}
    fold = request.getfixturevalue(shared[trainer]) if trainer in shared \
        else hippocampus.train(trainer, epochs=2, iters=2, val_iters=1)
    assert (fold / "checkpoint_final.pth").is_file()
    rows = _read_log(fold)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # What this machine can measure for a CPU run (no counter here: "unavailable"; RAPL or an estimate elsewhere).
    expected_source = _cpu_energy_source(hippocampus)
    for row in rows:
        assert float(row["epoch_s"]) > 0 and float(row["train_s"]) > 0
        assert row["energy_source"] == expected_source
        if expected_source == ENERGY_UNAVAILABLE:
            assert row["energy_j"] == "" and row["co2eq_g"] == ""  # missing, never 0
        else:
            assert float(row["energy_j"]) > 0 and float(row["co2eq_g"]) > 0
        assert row["gpu_energy_j"] == ""  # a CPU run measures no GPU
        assert float(row["host_rss_peak_mb"]) > 100
        assert float(row["meter_overhead_s"]) < 0.01 * float(row["epoch_s"])
    summary = json.loads((fold / "green_summary.json").read_text())
    precision, recipe = SETTINGS[trainer]
    assert summary["trainer"] == trainer
    assert summary["precision"] == precision.on(torch.device("cpu")).name
    assert summary["optimizer"] == recipe.name
    assert summary["optimizer_state_bytes"] > 0 and summary["num_parameters"] > 1e5
    assert summary["epochs_logged"] == 2
    assert summary["totals"]["energy_source"] == expected_source
    if expected_source == ENERGY_UNAVAILABLE:
        assert summary["totals"]["energy_j"] is None and summary["totals"]["epochs_without_energy"] == 2
    else:
        assert summary["totals"]["energy_j"] > 0 and summary["totals"]["epochs_without_energy"] == 0
    assert summary["nonfinite_steps_skipped"] == 0
    assert summary["energy"]["gpu"]["available"] is False and summary["energy"]["gpu"]["reason"]
    assert 0 <= summary["dice"]["validation_mean_fg_dice"] <= 1
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    if not precision.is_fp32:
        assert "precision is a GPU feature" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    assert len(checkpoint["logging"]["green_epoch_s"]) == 2


def test_continue_training_resumes_8bit_state_and_appends_the_log(hippocampus, trained_8bit_adamw):
    trainer, fold = ADAMW_TRAINER, trained_8bit_adamw  # two epochs done (checked above); --c trains a third
    first_rows = _read_log(fold)

    # Load it the way `nnUNetv2_train --c` does and compare the 8-bit state bit for bit.
    code = (
        "import torch, sys\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        f"t = get_trainer_from_args('4', '3d_fullres', 0, '{trainer}', device=torch.device('cpu'))\n"
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
    proc = subprocess.run([sys.executable, "-c", code], env=hippocampus.env(nnUNet_green_epochs=3),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("identical")[-1]) > 0  # 8-bit (uint8) state tensors were among them

    hippocampus.train(trainer, fold=0, epochs=3, iters=2, val_iters=1, extra_args=["--c"])
    rows = _read_log(fold)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and rows[:2] == first_rows
    summary = json.loads((fold / "green_summary.json").read_text())
    assert summary["epochs_logged"] == 3


def test_half_weights_stop_cleanly_when_steps_stay_non_finite(hippocampus):
    # fp16 weights really in use (forced on CPU); a one-sample 16^3 batch keeps the slow CPU fp16 path short.
    code = (
        "import torch\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        "t = get_trainer_from_args('4', '3d_fullres', 2, 'nnUNetTrainerGreenHalf8bit', device=torch.device('cpu'))\n"
        "t.max_consecutive_nonfinite_steps = 3\n"
        "t.initialize()\n"
        "assert all(p.dtype == torch.float16 for p in t.network.parameters())\n"
        "t.dataloader_train, _ = t.get_dataloaders()\n"
        "batch = next(t.dataloader_train)\n"
        # one sample cropped to 16^3 (targets of the deep-supervision scales cropped alike): CPU fp16 is slow
        "d = batch['data']\n"
        "def crop(x):\n"
        "    return x[(slice(0, 1), slice(None), *(slice(0, 16 * a // b) for a, b in zip(x.shape[2:], d.shape[2:])))]\n"
        "batch = {'data': torch.full_like(crop(d), float('nan')), 'target': [crop(x) for x in batch['target']]}\n"
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
