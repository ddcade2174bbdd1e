"""Stopping policy: plateau of nnU-Net's EMA pseudo-Dice, energy and time budgets (pure logic, no training)."""
from __future__ import annotations

import math

import pytest

from nnunet_green.contract import GreenSettings, SettingsError
from nnunet_green.training.stopping import StoppingPolicy, full_schedule_estimate, replay


def rows(n, epoch_s=10.0, energy_j=100.0):
    return [{"epoch": i, "epoch_s": epoch_s, "energy_j": energy_j} for i in range(n)]


def test_unset_never_stops():
    policy = StoppingPolicy.from_settings(GreenSettings.from_env({}))
    assert not policy.active
    assert policy.decide(rows(50), [0.5] * 50) is None


def test_plateau_stops_after_patience_epochs_without_gain():
    policy = StoppingPolicy(patience=3, min_delta=0.01)
    ema = [0.1, 0.3, 0.5, 0.505, 0.509, 0.508]  # last gain > 0.01 at epoch 2; 3 epochs since
    assert policy.decide(rows(5), ema[:5]) is None
    stop = policy.decide(rows(6), ema)
    assert stop["reason"] == "plateau" and stop["epoch"] == 5 and stop["best_epoch"] == 2
    assert stop["best_ema_pseudo_dice"] == pytest.approx(0.5) and stop["time_s"] == pytest.approx(60)


def test_small_gains_below_min_delta_do_not_reset_patience_but_large_ones_do():
    policy = StoppingPolicy(patience=2, min_delta=0.01)
    assert policy.decide(rows(4), [0.5, 0.505, 0.509, 0.52]) is None  # 0.52 beats 0.5 + 0.01 at epoch 3
    assert policy.decide(rows(3), [0.5, 0.505, 0.509])["reason"] == "plateau"


def test_no_plateau_stop_during_the_warm_up_and_its_default_is_a_tenth_of_the_schedule():
    # nnU-Net's EMA starts at epoch 0's pseudo-Dice; a dip after it is no plateau (a measured Hippocampus start)
    ema = [0.066, 0.059, 0.053, 0.048, 0.043, 0.039, 0.05, 0.08, 0.1]
    assert StoppingPolicy(patience=5, min_delta=0.005).decide(rows(6), ema[:6])["reason"] == "plateau"
    warm = StoppingPolicy.from_settings(GreenSettings.from_env({"nnUNet_green_patience": "5"}), num_epochs=120)
    assert warm.min_epochs == 12 and "not before epoch 12" in warm.describe()
    assert all(warm.decide(rows(n), ema[:n]) is None for n in range(1, len(ema) + 1))
    flat = [0.5] * 14
    assert warm.decide(rows(12), flat[:12]) is None and warm.decide(rows(13), flat[:13])["epoch"] == 12
    given = GreenSettings.from_env({"nnUNet_green_patience": "5", "nnUNet_green_min_epochs": "0"})
    assert StoppingPolicy.from_settings(given, num_epochs=120).min_epochs == 0
    with pytest.raises(SettingsError, match="nnUNet_green_min_epochs"):
        GreenSettings.from_env({"nnUNet_green_min_epochs": "-3"})


def test_a_plateau_starts_a_cool_down_then_stops_and_budgets_still_apply_while_cooling():
    policy = StoppingPolicy.from_settings(GreenSettings.from_env({"nnUNet_green_patience": "2"}))
    assert policy.cooldown == 2 and "then 2 cool-down epochs" in policy.describe()  # default: the patience
    ema = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    plateau = policy.decide(rows(3), ema[:3])
    assert plateau["reason"] == "plateau" and plateau["epoch"] == 2 and plateau["cooldown_epochs"] == 2
    assert "cooldown_from" not in plateau  # asks for the cool-down, not the stop
    assert policy.decide(rows(4), ema[:4], cooling_since=plateau) is None  # cooling: no new plateau
    stop = policy.decide(rows(5), ema[:5], cooling_since=plateau)
    assert stop["reason"] == "plateau" and stop["epoch"] == 4 and stop["plateau_epoch"] == 2
    assert stop["cooldown_from"] == 3 and stop["time_s"] == pytest.approx(50)
    budget = StoppingPolicy(patience=2, cooldown=10, budget_hours=45 / 3600)
    assert budget.decide(rows(4), ema[:4], cooling_since=plateau)["reason"] == "time_budget"
    assert StoppingPolicy.from_settings(GreenSettings.from_env(
        {"nnUNet_green_patience": "2", "nnUNet_green_cooldown": "0"})).cooldown == 0


def test_replay_finds_where_a_policy_would_have_stopped_a_full_run():
    ema = [0.1, 0.3, 0.5, 0.505, 0.509, 0.508, 0.52, 0.6, 0.61, 0.62]
    epoch_s = [10.0] * 10
    # gains <= 0.01 from epoch 2: patience 3 finds the plateau at epoch 5, two cool-down epochs stop it at 7
    r = replay(StoppingPolicy(patience=3, min_delta=0.01, cooldown=2), ema, epoch_s)
    assert (r["plateau_epoch"], r["best_epoch"], r["stop_epoch"]) == (5, 2, 7)
    assert r["time_saving"] == pytest.approx(0.2) and r["ema_at_plateau"] == 0.508
    assert r["ema_best_after_plateau"] == 0.62  # the full run climbed on: this plateau was not one
    assert replay(StoppingPolicy(patience=3, min_delta=0.01, cooldown=0), ema, epoch_s)["stop_epoch"] == 5
    assert replay(StoppingPolicy(patience=3, min_delta=0.01, cooldown=9), ema, epoch_s)["time_saving"] == 0
    never = replay(StoppingPolicy(patience=3, min_delta=0.001), [0.1 * i for i in range(10)], epoch_s)
    assert never["plateau_epoch"] is None and never["stop_epoch"] == 9 and never["time_saving"] == 0


def test_cool_down_anneals_the_rest_of_the_poly_schedule_into_its_epochs():
    import torch

    from nnunet_green.training.schedule import CoolDownPolyLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = CoolDownPolyLR(optimizer, initial_lr=0.01, max_steps=100)
    poly = [schedule.lr_at(e) for e in range(100)]
    assert poly[0] == pytest.approx(0.01) and poly[50] == pytest.approx(0.01 * 0.5 ** 0.9)
    schedule.cool_down(50, 4)
    cooled = [schedule.lr_at(e) for e in range(50, 54)]
    assert schedule.lr_at(49) == poly[49] and cooled[0] == pytest.approx(poly[50] * 0.8 ** 0.9)
    assert all(a > b for a, b in zip(cooled, cooled[1:])) and cooled[-1] == pytest.approx(poly[50] * 0.2 ** 0.9)
    schedule.step(52)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cooled[2])
    schedule.cancel_cool_down()
    assert schedule.lr_at(52) == poly[52]


def test_nan_epochs_never_count_as_improvement():
    policy = StoppingPolicy(patience=2)
    assert policy.decide(rows(3), [0.4, math.nan, math.nan])["best_epoch"] == 0


def test_time_budget_stops_before_the_next_epoch_would_overrun_it():
    policy = StoppingPolicy(budget_hours=50 / 3600)  # 50 s, epochs of 10 s
    assert policy.decide(rows(3), [0.1] * 3) is None      # 30 s spent, 40 s after the next: fits
    assert policy.decide(rows(4), [0.1] * 4) is None      # 40 s spent, another 10 s reaches 50 s exactly: fits
    stop = policy.decide(rows(5), [0.1] * 5)
    assert stop["reason"] == "time_budget" and stop["time_s"] <= 50


def test_energy_budget_uses_measured_joules_and_is_refused_without_a_counter():
    policy = StoppingPolicy(budget_kwh=450 / 3.6e6)  # 450 J, epochs of 100 J
    assert policy.decide(rows(3), [0.1] * 3) is None
    assert policy.decide(rows(4), [0.1] * 4)["reason"] == "energy_budget"
    unmeasured = [dict(r, energy_j=None) for r in rows(10)]
    assert policy.decide(unmeasured, [0.1] * 10) is None
    with pytest.raises(SettingsError, match="nnUNet_green_budget_hours"):
        policy.check_start("unavailable", energy_available=False)
    policy.check_start("rapl", energy_available=True)


def test_settings_are_validated():
    with pytest.raises(SettingsError, match="nnUNet_green_patience"):
        GreenSettings.from_env({"nnUNet_green_patience": "0"})
    with pytest.raises(SettingsError, match="nnUNet_green_min_delta"):
        GreenSettings.from_env({"nnUNet_green_min_delta": "-1"})
    with pytest.raises(SettingsError, match="nnUNet_green_budget_kwh"):
        GreenSettings.from_env({"nnUNet_green_budget_kwh": "lots"})
    s = GreenSettings.from_env({"nnUNet_green_patience": "5", "nnUNet_green_budget_hours": "1.5"})
    assert StoppingPolicy.from_settings(s) == StoppingPolicy(patience=5, budget_hours=1.5, cooldown=5)


def test_full_schedule_estimate_is_labelled_and_extrapolated():
    est = full_schedule_estimate(rows(4), epochs_done=4, num_epochs=10)
    assert "extrapolated" in est["method"]
    assert est["time_s"] == pytest.approx(100) and est["energy_j"] == pytest.approx(1000)
    assert est["epochs_saved"] == 6 and est["time_saved_s"] == pytest.approx(60)
    assert full_schedule_estimate([dict(r, energy_j=None) for r in rows(2)], 2, 10)["energy_j"] is None


# --- through the stock CLIs -----------------------------------------------------------------------------------------
def _machine_measures_cpu_energy() -> bool:
    import torch

    from nnunet_green.metering import EnergyMeter
    meter = EnergyMeter(torch.device("cpu"))
    meter.close()
    return meter.source != "unavailable"


def test_plateau_stops_the_nnunet_way_and_continue_does_not_train_on(hippocampus, tmp_path):
    import json

    from conftest import run_cli

    import torch

    # min_delta 1.0: no pseudo-Dice gain can count, so patience 1 finds the plateau after epoch 1 of 6; one
    # cool-down epoch (the default: the patience) at a lowered learning rate, then the stop
    stop_env = dict(nnUNet_green_patience=1, nnUNet_green_min_delta=1.0)
    fold = hippocampus.train("nnUNetTrainerGreen8bit", fold=2, epochs=6, iters=2, val_iters=1, **stop_env)
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / "checkpoint_latest.pth").exists()
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's final validation ran as after a full run
    summary = json.loads((fold / "green_summary.json").read_text())
    stop = summary["stopping"]
    assert stop["reason"] == "plateau" and stop["epoch"] == 2 and stop["plateau_epoch"] == 1
    assert stop["best_epoch"] == 0 and stop["cooldown_epochs"] == 1 and summary["epochs_logged"] == 3
    lrs = torch.load(fold / "checkpoint_final.pth", weights_only=False)["logging"]["lrs"]
    poly = [summary["initial_lr"] * (1 - e / 6) ** 0.9 for e in range(3)]
    assert lrs[:2] == pytest.approx(poly[:2]) and lrs[2] == pytest.approx(poly[2] * 0.5 ** 0.9)
    full = stop["full_schedule"]
    assert "extrapolated" in full["method"] and full["num_epochs"] == 6 and full["epochs_saved"] == 3
    assert full["time_s"] > summary["totals"]["time_s"] * 1.5  # 6 epochs extrapolated from 3
    assert summary["totals"]["data_wait_s"] is not None and 0 <= summary["totals"]["data_wait_fraction"] <= 1
    # replaying the same policy on the run's own logs finds the plateau the trainer found
    logs = torch.load(fold / "checkpoint_final.pth", weights_only=False)["logging"]
    policy = StoppingPolicy(patience=1, min_delta=1.0, cooldown=1)
    again = replay(policy, logs["ema_fg_dice"], logs["green_epoch_s"])
    assert (again["plateau_epoch"], again["stop_epoch"]) == (stop["plateau_epoch"], stop["epoch"])

    # `--c` with the same policy: the run is not trained on, and says so
    hippocampus.train("nnUNetTrainerGreen8bit", fold=2, epochs=6, iters=2, val_iters=1, extra_args=["--c"],
                      **stop_env)
    again = json.loads((fold / "green_summary.json").read_text())
    assert again["epochs_logged"] == 3 and again["stopping"]["reason"] == "plateau"
    logs = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "does not train on" in logs

    # the stopped model predicts like any other (this is also the suite's stock `nnUNetv2_predict -d` of a model
    # trained by a green trainer)
    out = tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", hippocampus.test_images, "-o", out, "-d", 4, "-c", "3d_fullres",
            "-tr", "nnUNetTrainerGreen8bit", "-f", 2, "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1,
            env=hippocampus.env())
    assert len(list(out.glob("*.nii.gz"))) == len(list(hippocampus.test_images.glob("*.nii.gz")))


def test_energy_budget_without_a_counter_is_refused_before_training(hippocampus):
    from conftest import DATASET_ID, run_cli

    if _machine_measures_cpu_energy():
        pytest.skip("this machine measures CPU energy: an energy budget is accepted here")
    proc = run_cli("nnUNetv2_train", DATASET_ID, "3d_fullres", 3, "-tr", "nnUNetTrainerGreenFP32", "-device", "cpu",
                   env=hippocampus.env(nnUNet_green_budget_kwh=0.5, nnUNet_green_epochs=1, nnUNet_green_iters=1),
                   check=False)
    assert proc.returncode != 0
    assert "nnUNet_green_budget_kwh" in proc.stderr and "nnUNet_green_budget_hours" in proc.stderr
    assert not (hippocampus.model_folder("nnUNetTrainerGreenFP32") / "fold_3" / "checkpoint_final.pth").exists()
