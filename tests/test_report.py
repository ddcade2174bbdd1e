"""nnunet-green-report on input trees written by the real writers: the green meter (EpochMeter, driven by a fake
clock and fake energy counters so that the numbers are known on any machine), CompressionManifest and BenchResult."""
from __future__ import annotations

import json
import pathlib
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from nnunet_green.compression.api import LayerRecord
from nnunet_green.contract import (BENCH_FILE, BENCH_FORMAT, EXIT_BAD_INPUT, EXIT_CODES_HELP, GREEN_LOG_FILE,
                                   GREEN_SUMMARY_FILE, LOG_COLUMNS, MANIFEST_FILE, BenchResult, CompressionManifest)
from nnunet_green.metering import EnergyMeter, EpochMeter
from nnunet_green.metering.carbon import CarbonSetting
from nnunet_green.report.cli import main
from nnunet_green.report.plots import pareto_front
from nnunet_green.training.stopping import starts_cool_down

BIN = Path(sys.executable).parent
INTENSITY = 380.0  # g/kWh
CARBON = CarbonSetting(INTENSITY, "test table", "DEU", pue=1.0)
EPOCHS = 6
DENSE_PARAMS, DENSE_MACS = 2_345_678, 9_000_000_000


class Clock:
    """time.perf_counter while a fold is written: advances only when the test says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeNvml:
    """The pynvml calls the meter makes; `counter_mj` is the GPU's total-energy counter."""

    def __init__(self):
        self.counter_mj = 5_000_000

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("handle", uuid)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(self.counter_mj)


class FakeCuda:
    """torch.cuda's memory statistics for a GPU run on any machine (with or without a GPU)."""

    def __init__(self, mem):
        self.alloc, self.reserved = mem, mem * 1.2

    def install(self, mp):
        mp.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
        mp.setattr(torch.cuda, "synchronize", lambda device=None: None)
        mp.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.alloc * 1024 ** 2)
        mp.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.reserved * 1024 ** 2)
        mp.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


def unreadable_rapl(root: Path, mp) -> Path:
    """A RAPL tree whose counters a non-root user cannot read (Linux >= 5.10), for the meter's own reason."""
    pkg = root / "intel-rapl:0"
    pkg.mkdir(parents=True)
    (pkg / "name").write_text("package-0\n")
    (pkg / "max_energy_range_uj").write_text("1000000\n")
    (pkg / "energy_uj").write_text("1\n")
    real_read_text = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    mp.setattr(pathlib.Path, "read_text", read_text)
    return root


def write_fold(folder: Path, trainer: str, precision: str, optimizer: str, *, device="cuda:0", gpu_w=250.0,
               cpu_w=None, epoch_s=30.0, mem=4000.0, dice=0.85, validation_dice=True, opt_bytes=123_456_789,
               summary=True, final_val=None, num_epochs=EPOCHS, policy=None, data_wait=None,
               params=DENSE_PARAMS, epochs_run=None) -> dict | None:
    """A fold folder as nnU-Net + the green meter leave it, written by EpochMeter; returns green_summary.json.

    GPU energy = gpu_w × time through a fake NVML counter (device cuda only); CPU energy: an estimate of cpu_w
    watts where given, else unavailable because RAPL is unreadable (the meter's own reason).
    `policy` (a StoppingPolicy): decided after every epoch on the meter's rows and nnU-Net's EMA pseudo-Dice, as
    the green trainer does, and the summary gets the trainer's own `stopping` record; without it the summary is
    that of a version before early stopping. `data_wait`: share of each epoch's training time waiting for data.
    `epochs_run`: epochs trained before the summary is written (default: the whole schedule, `num_epochs`).
    `validation_dice`: nnU-Net's final validation Dice (True: `dice` + 0.01, False: no final validation)."""
    folder.mkdir(parents=True)
    dev = torch.device(device)
    clock, nvml = Clock(), FakeNvml()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "perf_counter", clock)
        mp.delenv("nnUNet_green_cpu_watts", raising=False)
        cuda = FakeCuda(mem)
        if dev.type == "cuda":
            cuda.install(mp)
        with pytest.MonkeyPatch.context() as rapl_mp:  # unreadable only while the meter looks at it
            root = unreadable_rapl(folder.parent / f".rapl_{folder.name}", rapl_mp)
            energy = EnergyMeter(dev, nvml=nvml, rapl_root=root, rapl_poll_s=0, cpu_watts=cpu_w)
        meter = EpochMeter(folder, dev, energy=energy, carbon=CARBON)

        def spend(seconds):
            clock.t += seconds
            nvml.counter_mj += (gpu_w or 0.0) * seconds * 1000

        ema, decision, cooling_since, epochs_done = [], None, None, 0
        for e in range(num_epochs if epochs_run is None else epochs_run):
            t = epoch_s * (1.1 if e == 0 else 1.0) + 0.1 * e
            cuda.alloc = mem + e
            meter.start_epoch(e)
            spend(t * 0.9)
            meter.start_validation()
            spend(t * 0.1)
            pseudo = dice * (1 - 0.5 * 0.6 ** e)
            meter.end_epoch(train_loss=-0.2 - 0.05 * e, val_loss=-0.15 - 0.04 * e, pseudo_dice=pseudo,
                            data_wait_s=None if data_wait is None else t * 0.9 * data_wait)
            ema.append(pseudo if not ema else 0.9 * ema[-1] + 0.1 * pseudo)  # nnU-Net's ema_fg_dice
            epochs_done = e + 1
            if policy is not None and epochs_done < num_epochs:
                decision = policy.decide(meter.rows(), ema, cooling_since)
                if starts_cool_down(decision):
                    cooling_since = decision
                elif decision is not None:
                    break
        # what a real nnU-Net fold folder also holds; the report must ignore it
        (folder / "checkpoint_final.pth").write_bytes(b"\x80\x02not a real checkpoint")
        (folder / "progress.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (folder / "training_log_2026_1_1_00_00_00.txt").write_text("epoch 0\n")
        (folder / "debug.json").write_text("{}")
        (folder / "validation").mkdir()
        vdice = None if validation_dice is False else dice + 0.01 if validation_dice is True else validation_dice
        if vdice is not None:  # nnU-Net's own file
            (folder / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": vdice}}))
        if final_val is not None:
            with meter.measure("final_validation"):
                clock.t += 12.0
                nvml.counter_mj += final_val * 1000
        if not summary:
            return None
        # the keys nnUNetTrainerGreen._write_summary passes to the meter
        extra = {"trainer": trainer, "precision": precision, "requested_precision": precision,
                 "optimizer": optimizer, "initial_lr": 0.01, "optimizer_state_bytes": opt_bytes,
                 "num_parameters": params, "num_epochs": num_epochs, "iterations_per_epoch": 250,
                 "val_iterations_per_epoch": 50, "nonfinite_steps_skipped": 0,
                 "dice": {"pseudo_dice_last": dice * (1 - 0.5 * 0.6 ** (epochs_done - 1)),
                          "ema_pseudo_dice_best": dice - 0.02, "validation_mean_fg_dice": vdice}}
        if policy is not None:
            extra["stopping"] = trainer_stopping_record(meter, policy, decision, epochs_done, num_epochs)
        return meter.write_summary(extra)


def trainer_stopping_record(meter, policy, decision, epochs_done: int, num_epochs: int) -> dict:
    """green_summary.json["stopping"] as the green trainer writes it: its own `_stopping_summary`, run on a
    stand-in holding just the state it reads (the meter, the stop decision, nnU-Net's epoch counters)."""
    from types import SimpleNamespace

    from nnunet_green.training.green_trainer import nnUNetTrainerGreen
    state = SimpleNamespace(meter=meter, stop_record=decision, current_epoch=epochs_done, num_epochs=num_epochs,
                            stopping=policy)
    return nnUNetTrainerGreen._stopping_summary(state)


def model_folder(root: Path, trainer: str) -> Path:
    return root / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans__3d_fullres"


def layers(rank: int, params_after: int) -> list[dict]:
    return [LayerRecord("encoder.stages.0.0.convs.0.conv", ["encoder.stages.0.0.convs.0.conv"], "Conv3d", 1, 32,
                        (3, 3, 3), (1, 1, 1), None, None, 896, 896, 1, 1, None, False, "rank would not save").to_dict(),
            LayerRecord("encoder.stages.1.0.convs.0.conv", ["encoder.stages.1.0.convs.0.conv"], "Conv3d", 32, 64,
                        (3, 3, 3), (2, 2, 2), rank, rank, 55360, params_after, 9, 1, 0.4, True, None, 0.2).to_dict()]


def distillation(steps=200, kept=150, agree=(0.912, 0.968), err=(0.41, 0.22), kind="distilled") -> dict:
    """A recovery record with the keys distill_model_folder writes (one fold)."""
    rec = {"method": "distillation", "teacher": "/dense", "images": 4, "steps": steps, "lr": 1e-4,
           "optimizer": "AdamW", "loss": "kl", "steps_done": steps, "kept_step": kept,
           "heldout_agreement_before": agree[0], "heldout_agreement_after": agree[1],
           "heldout_rel_error_before": err[0], "heldout_rel_error_after": err[1], "seconds": 42.0,
           "energy_j": None, "energy_source": "unavailable", "folds": ["0"]}
    if kind:
        rec["kind"] = kind
    return rec


def write_compressed(folder: Path, src: Path, ratio: float | None, params_after: int, macs_after: int, *,
                     budget: float | None = None, recovery: dict | None = None, extra: dict | None = None
                     ) -> CompressionManifest:
    (folder / "fold_0").mkdir(parents=True)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
    (folder / "plans.json").write_text("{}")
    m = CompressionManifest(
        source={"path": str(src), "checkpoints": {"fold_0/checkpoint_final.pth": "ab" * 32}},
        config={"rank_ratio": None if budget is not None else ratio, "budget": budget,
                "budget_cost": "params" if budget is not None else None, "min_rank": 8, "round_to": 8, "half": False},
        rank_rule=(f"budgeted ranks: {budget:g} of the factorizable layers' params" if budget is not None
                   else f"uniform rank ratio {ratio:g}"),
        configuration="3d_fullres", folds=["0"],
        totals={"params_before": DENSE_PARAMS, "params_after": params_after, "macs_before": DENSE_MACS,
                "macs_after": macs_after, "decomposition_s": 3.5},
        layers=layers(8, 2304), nnunet_green_version="0.1.0", created="2026-01-01T00:00:00",
        patch_size=[40, 56, 40], recovery=recovery, trainer_name="nnUNetTrainerGreenFP32", extra=dict(extra or {}))
    m.write(folder / MANIFEST_FILE)
    return m


def bench_row(path: Path, params: int, macs: int, lat: float, agree, labels: bool, rule=None, kept=None,
              ratio=None) -> dict:
    """One model row as nnunet-green-bench writes it (with "rule"/"kept_fraction" unless rule is None: an older
    bench)."""
    row = {"name": path.name, "path": str(path), "fold": "0", "rank_ratio": ratio, "params": params, "macs": macs,
           "patch_size": [40, 56, 40], "latency_s": {"median": lat, "runs": [lat] * 3}, "predict_wall_s": 15.0,
           "dice_vs_labels": (agree - 0.1 if agree is not None else 0.86) if labels else None,
           "agreement_dice": agree}
    if rule is not None:
        row.update(rule=rule, kept_fraction=kept)
    return row


def write_bench(folder: Path, ref: Path, compressed: list[tuple[Path, int, int, float, float]], labels=True,
                new_keys=True) -> Path:
    """bench.json via BenchResult: the reference first, then each compressed folder (rule and rank ratio read from
    its compression.json, as the bench does)."""
    folder.mkdir(parents=True)
    models = [bench_row(ref, DENSE_PARAMS, DENSE_MACS, 0.200, None, labels, rule="dense" if new_keys else None,
                        kept=1.0)]
    models[0]["predict_wall_s"] = 20.0
    for path, params, macs, lat, agree in compressed:
        m = CompressionManifest.read(path / MANIFEST_FILE)
        models.append(bench_row(path, params, macs, lat, agree, labels, rule=m.rule_label if new_keys else None,
                                kept=m.kept_fraction, ratio=m.config.get("rank_ratio")))
    BenchResult(models=models, reference=ref.name, created="2026-01-01T00:00:00", device="cpu",
                machine={"cpu": "test cpu", "gpu": None, "torch_threads": 2, "torch": "2.x"}, repeats=3, warmup=1,
                images="/data/imagesTs", labels="/data/labelsTs" if labels else None, tta=True
                ).write(folder / BENCH_FILE)
    return folder / BENCH_FILE


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    res = root / "results"
    fp32 = model_folder(res, "nnUNetTrainerGreenFP32")
    s = {"fp32": [write_fold(fp32 / f"fold_{k}", "nnUNetTrainerGreenFP32", "fp32", "sgd", epoch_s=40.0 + k,
                             gpu_w=300.0, mem=6000.0, dice=0.84 + 0.02 * k, final_val=500.0) for k in (0, 1)]}
    s["amp8"] = write_fold(model_folder(res, "nnUNetTrainerGreenAMP8bit") / "fold_0", "nnUNetTrainerGreenAMP8bit",
                           "amp", "sgd8bit", epoch_s=20.0, gpu_w=250.0, cpu_w=65.0, mem=3000.0, dice=0.83,
                           opt_bytes=30_000_000)
    s["bf16"] = write_fold(model_folder(res, "nnUNetTrainerGreenBF16") / "fold_0", "nnUNetTrainerGreenBF16", "bf16",
                           "sgd", epoch_s=22.0, gpu_w=260.0, mem=3500.0, dice=0.86)
    # a CPU run on a machine whose RAPL counters are not readable: energy unavailable
    s["cpu"] = write_fold(model_folder(res, "nnUNetTrainerGreen8bit") / "fold_0", "nnUNetTrainerGreen8bit", "fp32",
                          "sgd8bit", device="cpu", gpu_w=None, epoch_s=300.0, dice=0.80, validation_dice=False)
    comp = root / "compressed"
    m = {"r0.12": write_compressed(comp / "fp32_r0.12", fp32, 0.12, 400_000, 2_000_000_000),
         "r0.25": write_compressed(comp / "fp32_r0.25", fp32, 0.25, 900_000, 3_500_000_000),
         # budgeted ranks: rank_ratio is null in compression.json and bench.json
         "b0.12": write_compressed(comp / "fp32_b0.12", fp32, None, 300_000, 1_500_000_000, budget=0.12),
         "b0.12d": write_compressed(comp / "fp32_b0.12_distilled", fp32, None, 300_000, 1_500_000_000, budget=0.12,
                                    recovery=distillation()),
         "b0.2c": write_compressed(comp / "fp32_b0.2_calibrated", fp32, None, 500_000, 2_500_000_000, budget=0.2,
                                   extra={"calibration": {"images": 4, "source": "/data/imagesTr"}})}
    # fine-tuned: nnUNetTrainerTuckerFinetune metered its run in the compressed folder's fold_0
    ft = comp / "fp32_r0.12_finetuned"
    write_compressed(ft, fp32, 0.12, 400_000, 2_000_000_000,
                     recovery={"method": "finetune", "kind": "fine-tuned", "trainer": "nnUNetTrainerTuckerFinetune",
                               "from": str(comp / "fp32_r0.12"), "fold": 0, "epochs": EPOCHS, "seconds": 130.0,
                               "metering": f"fold_0/{GREEN_SUMMARY_FILE}"})
    (ft / "fold_0" / "checkpoint_final.pth").unlink()
    (ft / "fold_0").rmdir()
    s["ft"] = write_fold(ft / "fold_0", "nnUNetTrainerTuckerFinetune", "fp32", "adamw", epoch_s=10.0, gpu_w=200.0,
                         dice=0.835)
    m["ft"] = CompressionManifest.read(ft / MANIFEST_FILE)
    bench = write_bench(root / "bench_out", fp32, [(comp / "fp32_r0.12", 400_000, 2_000_000_000, 0.080, 0.93),
                                                  (comp / "fp32_r0.25", 900_000, 3_500_000_000, 0.110, 0.97),
                                                  (comp / "fp32_b0.12", 300_000, 1_500_000_000, 0.070, 0.90),
                                                  (comp / "fp32_b0.12_distilled", 300_000, 1_500_000_000, 0.070,
                                                   0.95)])
    return {"root": root, "results": res, "summaries": s, "bench": bench, "fp32": fp32, "compressed": comp,
            "manifests": m}


@pytest.fixture(scope="module")
def report(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run([str(BIN / "nnunet-green-report"), str(tree["root"]), "-o", str(out), "--title", "Test"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "json": json.loads((out / "report.json").read_text()),
            "md": (out / "report.md").read_text(), "html": (out / "report.html").read_text(), "stdout": proc.stdout}


def rows_by_setting(report):
    return {r["setting"]: r for r in report["json"]["training"]["rows"]}


def md_row(md: str, name: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def md_cell(md: str, name: str, header: str, first: str = "Setting") -> str:
    head = next(ln for ln in md.splitlines() if ln.startswith(f"| {first} |"))
    headers = [c.strip() for c in head.strip("|").split("|")]
    return md_row(md, name)[headers.index(header)]


def md_comp_cell(md: str, name: str, header: str) -> str:
    return md_cell(md, name, header, first="Model")


def test_every_setting_is_one_row(report):
    rows = rows_by_setting(report)
    names = ["nnUNetTrainerGreenFP32", "nnUNetTrainerGreenAMP8bit", "nnUNetTrainerGreenBF16", "nnUNetTrainerGreen8bit"]
    assert sorted(rows) == sorted(names)
    assert report["json"]["training"]["rows"][0]["setting"] == "nnUNetTrainerGreenFP32"  # baseline first
    for n in names:
        assert md_row(report["md"], n)
        assert f"<td>{n}</td>" in report["html"]
    assert rows["nnUNetTrainerGreenFP32"]["folds"] == 2
    assert rows["nnUNetTrainerGreenFP32"]["fold_names"] == ["0", "1"]


def test_numbers_parse_back_to_inputs(report, tree):
    rows, s = rows_by_setting(report), tree["summaries"]
    fp32 = rows["nnUNetTrainerGreenFP32"]
    # folds of a model folder: energy/time/CO2 summed, Dice averaged, memory max
    assert fp32["energy_j"] == pytest.approx(sum(f["totals"]["energy_j"] for f in s["fp32"]))
    assert fp32["time_s"] == pytest.approx(sum(f["totals"]["time_s"] for f in s["fp32"]))
    assert fp32["co2eq_g"] == pytest.approx(sum(f["totals"]["co2eq_g"] for f in s["fp32"]))
    assert fp32["energy_kwh"] == pytest.approx(fp32["energy_j"] / 3.6e6)
    assert fp32["dice"] == pytest.approx((s["fp32"][0]["dice"]["validation_mean_fg_dice"]
                                          + s["fp32"][1]["dice"]["validation_mean_fg_dice"]) / 2)
    assert fp32["gpu_mem_alloc_peak_mb"] == pytest.approx(max(f["totals"]["gpu_mem_alloc_peak_mb"]
                                                              for f in s["fp32"]))
    # comparisons use the cost per fold: fp32 has 2 folds, the others 1
    assert fp32["dice_per_kj"] == pytest.approx(fp32["dice"] / (fp32["energy_j"] / 2 / 1000))
    bf16 = rows["nnUNetTrainerGreenBF16"]
    assert bf16["energy_j"] == pytest.approx(s["bf16"]["totals"]["energy_j"])
    assert bf16["dice_per_kj"] == pytest.approx(bf16["dice"] / (bf16["energy_j"] / 1000))
    assert bf16["relative_to_baseline"]["x_energy"] == pytest.approx(bf16["energy_j"] / (fp32["energy_j"] / 2))
    assert bf16["relative_to_baseline"]["x_time"] == pytest.approx(bf16["time_s"] / (fp32["time_s"] / 2))
    assert bf16["relative_to_baseline"]["x_mem"] == pytest.approx(
        bf16["gpu_mem_alloc_peak_mb"] / fp32["gpu_mem_alloc_peak_mb"])
    # the markdown shows the same numbers
    j = float(re.match(r"([\d,]+) J", md_cell(report["md"], "nnUNetTrainerGreenBF16", "Energy")).group(1)
              .replace(",", ""))
    assert j == pytest.approx(bf16["energy_j"], abs=1)
    assert bf16["dice"] == pytest.approx(s["bf16"]["dice"]["validation_mean_fg_dice"])
    assert re.fullmatch(re.escape(f"{bf16['dice']:.4f}") + r"<sup>\[\d+\]</sup>",
                        md_cell(report["md"], "nnUNetTrainerGreenBF16", "Dice"))  # value + which-Dice footnote
    assert md_cell(report["md"], "nnUNetTrainerGreenFP32", "×energy") == "1.00×"
    assert md_cell(report["md"], "nnUNetTrainerGreenFP32", "Optimizer state") == "117.7 MB"


def test_missing_is_dash_with_reason_never_zero(report, tree):
    rows = rows_by_setting(report)
    cpu = rows["nnUNetTrainerGreen8bit"]
    assert cpu["energy_j"] is None and cpu["co2eq_g"] is None and cpu["gpu_mem_alloc_peak_mb"] is None
    # the meter's own reason, as it recorded it in green_summary.json
    reason = tree["summaries"]["cpu"]["energy"]["cpu"]["reason"]
    assert "not readable" in reason and reason in cpu["missing_reasons"]["energy_j"]
    for header in ("Energy", "CO2eq", "Peak GPU mem", "Dice/kJ", "×energy"):
        cell = md_cell(report["md"], "nnUNetTrainerGreen8bit", header)
        assert cell.startswith("—<sup>["), (header, cell)
        assert not re.match(r"0(\.0*)?\b", cell)
    # the footnote carries the reason
    n = re.search(r"\[(\d+)\]", md_cell(report["md"], "nnUNetTrainerGreen8bit", "Energy")).group(1)
    assert re.search(rf"^\[{n}\] .*RAPL counters .* not readable", report["md"], re.M)
    # no validation/summary.json: Dice falls back to the EMA pseudo Dice and says so
    assert "EMA pseudo Dice" in cpu["dice_source"]
    assert cpu["dice"] == pytest.approx(0.80 - 0.02)


def test_estimate_is_marked(report):
    rows = rows_by_setting(report)
    amp = rows["nnUNetTrainerGreenAMP8bit"]
    assert amp["energy_estimated"] and not rows["nnUNetTrainerGreenBF16"]["energy_estimated"]
    assert "65 W" in amp["estimate_note"]
    energy = md_cell(report["md"], "nnUNetTrainerGreenAMP8bit", "Energy")
    assert energy.startswith("≈") and "(est.)" in energy
    assert md_cell(report["md"], "nnUNetTrainerGreenAMP8bit", "×energy").endswith("(est.)")
    assert "(est.)" not in md_cell(report["md"], "nnUNetTrainerGreenBF16", "Energy")
    assert 'class="est"' in report["html"]


def test_compressed_table_joins_bench_and_manifests(report, tree):
    rows = {r["name"]: r for r in report["json"]["compression"]["rows"]}
    assert set(rows) == {"nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres", "fp32_r0.12", "fp32_r0.25", "fp32_b0.12",
                         "fp32_b0.12_distilled", "fp32_b0.2_calibrated", "fp32_r0.12_finetuned"}
    r12 = rows["fp32_r0.12"]
    assert r12["rank_ratio"] == 0.12 and r12["compressed"]
    assert r12["rule"] == "ratio 0.12" and r12["display"]["rule"] == "ratio 0.12"
    assert r12["kept_fraction"] == pytest.approx(400_000 / DENSE_PARAMS)
    assert r12["params_removed_frac"] == pytest.approx(1 - 400_000 / 2_345_678)
    assert r12["macs_ratio"] == pytest.approx(2 / 9)
    assert r12["speedup"] == pytest.approx(0.200 / 0.080)
    assert r12["agreement_dice"] == pytest.approx(0.93)
    assert r12["decomposition_s"] == pytest.approx(3.5)
    assert r12["source_run"] == "nnUNetTrainerGreenFP32"  # joined by path to the training run
    assert r12["recovery"] is None and r12["display"]["recovery"] == "none"
    ref = rows["nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres"]
    assert ref["is_reference"] and ref["display"]["agreement"] == "—"
    assert ref["display"]["rule"] == "dense" and ref["kept_fraction"] == 1.0
    assert "2.50× speed-up" in report["md"] and "(−82.9%)" in report["md"]
    # not benchmarked: still a row, from its compression.json
    cal = rows["fp32_b0.2_calibrated"]
    assert cal["not_benchmarked"] and cal["rule"] == "budget 0.2 params calibrated"
    assert cal["kept_fraction"] == pytest.approx(500_000 / DENSE_PARAMS)


def test_budgeted_model_shows_its_rule_and_is_plotted(report, tree):
    rows = {r["name"]: r for r in report["json"]["compression"]["rows"]}
    b = rows["fp32_b0.12"]
    assert b["rank_ratio"] is None  # what the compressor writes for budgeted ranks
    assert b["rule"] == tree["manifests"]["b0.12"].rule_label == "budget 0.12 params"
    assert b["budget"] == 0.12 and b["budget_cost"] == "params"
    assert b["display"]["rule"] == "budget 0.12 params" and b["display"]["kept"] == f"{300_000 / DENSE_PARAMS:.3f}"
    assert "ranks: budgeted ranks: 0.12" in b["footnotes"]["rule"][0]  # the manifest's rank_rule
    assert "rank ratio not recorded" not in report["md"] and "rule not recorded" not in report["md"]
    assert re.fullmatch(r"budget 0\.12 params<sup>\[\d+\]</sup>", md_comp_cell(report["md"], "fp32_b0.12", "Rule"))
    # every compressed model is placed on the kept-fraction axis of both compression figures
    figs = {f["file"]: f for f in report["json"]["compression"]["figures"]}
    for name in ("compression_size.png", "compression_dice.png"):
        data = figs[name]["data"]
        assert data["x"] == "kept_fraction" and data["left_out"] == []
        points = {p["model"]: p for p in data["points"]}
        assert points["fp32_b0.12"]["kept_fraction"] == pytest.approx(300_000 / DENSE_PARAMS)
        assert points["fp32_b0.12"]["family"] == "budget" and points["fp32_b0.12"]["recovery"] is None
        assert points["fp32_r0.25"]["family"] == "ratio"
        assert points["fp32_b0.12_distilled"]["recovery"] == "distilled"
    size = {p["model"]: p for p in figs["compression_size.png"]["data"]["points"]}
    assert set(size) == set(rows) - {"nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres"}
    assert size["fp32_b0.2_calibrated"]["family"] == "calibrated"
    assert size["fp32_r0.12_finetuned"]["recovery"] == "fine-tuned"
    assert size["fp32_b0.12"]["latency_s"] == pytest.approx(0.070)
    dice = {p["model"]: p for p in figs["compression_dice.png"]["data"]["points"]}
    assert dice["fp32_b0.12"]["agreement_dice"] == pytest.approx(0.90)


def test_recovered_models_show_kind_and_figures(report):
    rows = {r["name"]: r for r in report["json"]["compression"]["rows"]}
    d = rows["fp32_b0.12_distilled"]
    assert d["rule"] == "budget 0.12 params + distilled"
    rec = d["recovery"]
    assert rec["kind"] == "distilled" and rec["steps_done"] == 200 and rec["kept_step"] == 150
    assert (rec["heldout_agreement_before"], rec["heldout_agreement_after"]) == (0.912, 0.968)
    assert (rec["heldout_rel_error_before"], rec["heldout_rel_error_after"]) == (0.41, 0.22)
    text = md_comp_cell(report["md"], "fp32_b0.12_distilled", "Recovery")
    assert text.startswith("distilled, 200 steps (kept step 150)")
    assert "held-out agreement 0.912 → 0.968" in text and "rel. error 0.410 → 0.220" in text
    ft = rows["fp32_r0.12_finetuned"]
    assert ft["rule"] == "ratio 0.12 + fine-tuned" and ft["recovery"]["kind"] == "fine-tuned"
    # the fine-tune's Dice and energy come from the green_summary.json its record names
    assert ft["recovery"]["dice"] == pytest.approx(0.835 + 0.01)
    assert ft["recovery"]["energy_j"] == pytest.approx(200.0 * sum(10.0 * (1.1 if e == 0 else 1) + 0.1 * e
                                                                   for e in range(EPOCHS)), rel=1e-5)
    assert md_comp_cell(report["md"], "fp32_r0.12_finetuned", "Recovery") == f"fine-tuned, {EPOCHS} epochs: Dice 0.8450"
    assert "Recovery: distillation reports its held-out patches" in report["md"]


def test_figures_are_real_pngs_and_embedded(report):
    figs = report["json"]["training"]["figures"] + report["json"]["compression"]["figures"]
    names = {f["file"] for f in figs}
    assert names == {"radar.png", "energy_per_epoch.png", "pseudo_dice_per_epoch.png", "dice_per_kj.png",
                     "pareto_dice_energy.png", "compression_size.png", "compression_dice.png"}
    for name in names:
        data = (report["out"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", data[16:24])
        assert 400 <= w <= 3000 and 300 <= h <= 3000, (name, w, h)
        assert len(data) > 10_000
        assert f"]({name})" in report["md"]
    assert report["html"].count("data:image/png;base64,") == len(names)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", report["html"])  # self-contained


def test_radar_keeps_a_dice_of_zero(tmp_path):
    """An untrained model's Dice is 0, a value, not a missing one: the radar draws it at 0 rather than dropping the
    axis (and, without energy, the whole radar). Seen on the suite's 2-epoch model."""
    res = tmp_path / "results"
    for trainer in ("nnUNetTrainerGreenFP32", "nnUNetTrainerGreenBF16"):
        write_fold(model_folder(res, trainer) / "fold_0", trainer, "fp32", "sgd", device="cpu", gpu_w=None,
                   epoch_s=100.0, dice=0.01, validation_dice=0.0)
    out = tmp_path / "rep"
    assert main([str(res), "-o", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [r["dice"] for r in data["training"]["rows"]] == [0.0, 0.0]
    assert "radar.png" in {f["file"] for f in data["training"]["figures"]}


def test_pareto_front():
    pts = [(1.0, 0.8), (2.0, 0.85), (1.5, 0.79), (3.0, 0.84), (0.5, 0.6)]
    assert pareto_front(pts) == [4, 0, 1]


def test_cpu_only_runs_without_energy(tmp_path):
    """No readable RAPL, no GPU (the meter says unavailable). Energy figures are skipped with a reason; time per
    epoch instead."""
    res = tmp_path / "results"
    write_fold(model_folder(res, "nnUNetTrainerGreenFP32") / "fold_0", "nnUNetTrainerGreenFP32", "fp32", "sgd",
               device="cpu", gpu_w=None, epoch_s=100.0)
    write_fold(model_folder(res, "nnUNetTrainerGreenBF16") / "fold_0", "nnUNetTrainerGreenBF16", "bf16", "sgd",
               device="cpu", gpu_w=None, epoch_s=80.0, dice=0.8, summary=False)
    out = tmp_path / "rep"
    assert main([str(res), "-o", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    files = {f["file"] for f in data["training"]["figures"]}
    assert files == {"radar.png", "time_per_epoch.png", "pseudo_dice_per_epoch.png"}
    skipped = {f["figure"]: f["reason"] for f in data["training"]["skipped_figures"]}
    assert "Dice per kJ" in skipped and "Pareto front Dice vs energy" in skipped
    assert not (out / "energy_per_epoch.png").exists()
    md = (out / "report.md").read_text()
    assert "Dice per kJ: no run has both Dice and energy" in md
    assert data["compression"]["empty_reason"]
    rows = {r["setting"]: r for r in data["training"]["rows"]}
    # no green_summary.json: totals from the log, names from the model folder
    assert rows["nnUNetTrainerGreenBF16"]["time_s"] == pytest.approx(sum(80.0 * (1.1 if e == 0 else 1) + 0.1 * e
                                                                        for e in range(EPOCHS)), rel=1e-5)
    assert rows["nnUNetTrainerGreenBF16"]["precision"] is None
    assert rows["nnUNetTrainerGreenBF16"]["relative_to_baseline"]["x_mem"] is not None  # host RSS compared


def test_single_fold_folder_and_bench_file(tree, tmp_path):
    out = tmp_path / "rep"
    fold = tree["results"] / "Dataset004_Hippocampus" / "nnUNetTrainerGreenBF16__nnUNetPlans__3d_fullres" / "fold_0"
    assert main([str(fold), str(tree["bench"]), "-o", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [r["setting"] for r in data["training"]["rows"]] == ["nnUNetTrainerGreenBF16"]
    # compressed folders not given: bench sizes are relative to the bench's reference
    rows = {r["name"]: r for r in data["compression"]["rows"]}
    assert rows["fp32_r0.25"]["params_removed_frac"] == pytest.approx(1 - 900_000 / 2_345_678)
    assert not rows["fp32_r0.25"]["compressed"]
    skipped = {f["figure"] for f in data["training"]["skipped_figures"]}
    assert "Pareto front Dice vs energy" in skipped  # one run cannot make a front


@pytest.mark.parametrize("make", ["missing", "empty", "bad_json_file"])
def test_bad_input_fails_clearly(tmp_path, make):
    target = tmp_path / "x"
    if make == "empty":
        (target / "sub").mkdir(parents=True)
        (target / "sub" / "notes.txt").write_text("nothing")
    elif make == "bad_json_file":
        target = tmp_path / "other.json"
        target.write_text('{"format": "something-else"}')
    proc = subprocess.run([str(BIN / "nnunet-green-report"), str(target), "-o", str(tmp_path / "rep")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.startswith("nnunet-green-report: error: ") and str(target) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "rep" / "report.md").exists()


def test_stale_figures_are_removed(tree, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "dice_per_kj.png").write_bytes(zlib.compress(b"old"))
    fold = model_folder(tree["results"], "nnUNetTrainerGreen8bit")
    assert main([str(fold), "-o", str(out)]) == 0
    assert not (out / "dice_per_kj.png").exists()


def test_real_nnunet_fold_folder(trained_fp32, tmp_path):
    """A fold folder written by the real `nnUNetv2_train -tr nnUNetTrainerGreenFP32` on this CPU machine."""
    out = tmp_path / "rep"
    assert main([str(trained_fp32.parent), "-o", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    (row,) = data["training"]["rows"]
    summary = json.loads((trained_fp32 / "green_summary.json").read_text())
    assert row["setting"] == "nnUNetTrainerGreenFP32" and row["folds"] == 1
    assert row["time_s"] == pytest.approx(summary["totals"]["time_s"])
    assert row["parameters"] == summary["num_parameters"]
    if summary["totals"]["energy_j"] is None:  # no RAPL here: a dash and the meter's reason, never 0
        assert row["energy_j"] is None and row["display"]["energy"] == "—"
        assert row["footnotes"]["energy"]
    else:
        assert row["energy_j"] == pytest.approx(summary["totals"]["energy_j"])
    assert (out / "radar.png").is_file() and (out / "pseudo_dice_per_epoch.png").is_file()


def _as_previous_version(folder: Path, recovery: dict | None) -> None:
    """Rewrite a compression.json with the keys the previous version wrote: no rank_rule/trainer_name/
    dense_network_class/verification, no budget keys in config, a recovery record without "kind"."""
    data = json.loads((folder / MANIFEST_FILE).read_text())
    for k in ("rank_rule", "trainer_name", "dense_network_class", "verification"):
        data.pop(k)
    for k in ("budget", "budget_cost"):
        data["config"].pop(k)
    data["recovery"] = recovery
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2))


def test_previous_version_inputs_render(tmp_path):
    """compression.json and bench.json of the previous version (no "rule", "kept_fraction", recovery "kind")."""
    res = tmp_path / "results"
    fp32 = model_folder(res, "nnUNetTrainerGreenFP32")
    write_fold(fp32 / "fold_0", "nnUNetTrainerGreenFP32", "fp32", "sgd")
    comp = tmp_path / "compressed"
    write_compressed(comp / "old_r0.12_distilled", fp32, 0.12, 400_000, 2_000_000_000)
    _as_previous_version(comp / "old_r0.12_distilled", distillation(kind=None))
    write_compressed(comp / "old_r0.25_ft", fp32, 0.25, 900_000, 3_500_000_000)
    _as_previous_version(comp / "old_r0.25_ft", {"method": "finetune", "epochs": 3, "fold": 0,
                                                 "metering": f"fold_0/{GREEN_SUMMARY_FILE}"})  # not there: a warning
    write_compressed(comp / "old_budget", fp32, None, 300_000, 1_500_000_000, budget=0.12)
    bench = write_bench(tmp_path / "bench_out", fp32, [(comp / "old_r0.12_distilled", 400_000, 2_000_000_000, 0.08,
                                                        0.95),
                                                       (comp / "old_budget", 300_000, 1_500_000_000, 0.07, 0.9)],
                        new_keys=False)
    assert "rule" not in json.loads(bench.read_text())["models"][1]
    out = tmp_path / "rep"
    assert main([str(res), str(comp / "old_r0.12_distilled"), str(comp / "old_r0.25_ft"), str(bench),
                 "-o", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in data["compression"]["rows"]}
    d = rows["old_r0.12_distilled"]
    assert d["rule"] == "ratio 0.12 + distilled" and d["recovery"]["kind"] == "distilled"
    assert "held-out agreement 0.912 → 0.968" in d["display"]["recovery"]
    assert d["kept_fraction"] == pytest.approx(400_000 / DENSE_PARAMS)
    ft = rows["old_r0.25_ft"]
    assert ft["rule"] == "ratio 0.25 + fine-tuned" and ft["display"]["recovery"] == "fine-tuned, 3 epochs"
    assert any("old_r0.25_ft" in w and "fold_0/green_summary.json" in w for w in data["warnings"])
    # a budgeted model whose compression.json was not given and a bench without "rule": a dash with the reason,
    # and still placed on the kept-fraction axis from the bench's parameter counts
    b = rows["old_budget"]
    assert b["rule"] is None and b["display"]["rule"] == "—"
    assert "rule not recorded" in b["footnotes"]["rule"][0]
    assert b["kept_fraction"] == pytest.approx(300_000 / DENSE_PARAMS)
    figs = {f["file"]: f["data"] for f in data["compression"]["figures"]}
    for name in ("compression_size.png", "compression_dice.png"):
        assert {p["model"] for p in figs[name]["points"]} >= {"old_r0.12_distilled", "old_budget"}
    assert {p["model"]: p for p in figs["compression_size.png"]["points"]}["old_budget"]["family"] == "other"


def test_recovery_of_several_folds_is_their_mean(tmp_path):
    """distill_model_folder writes {fold_X: value} for each figure when it distilled several folds."""
    from nnunet_green.report.collect import Compressed, recovery_figures
    from nnunet_green.report.tables import fmt_recovery
    rec = distillation()
    for k, (a, b) in {"heldout_agreement_before": (0.90, 0.92), "heldout_agreement_after": (0.96, 0.98),
                      "steps_done": (200, 100)}.items():
        rec[k] = {"fold_0": a, "fold_1": b}
    m = write_compressed(tmp_path / "c", tmp_path / "dense", 0.12, 400_000, 2_000_000_000, recovery=rec)
    warnings: list[str] = []
    fig = recovery_figures(Compressed(tmp_path / "c", m), warnings)
    assert fig["heldout_agreement_before"] == pytest.approx(0.91) and fig["steps_done"] == pytest.approx(150)
    assert fig["folds_averaged"] == 2 and fig["heldout_rel_error_after"] == 0.22 and warnings == []
    text = fmt_recovery(fig)
    assert text.startswith("distilled, 150 steps") and "agreement 0.910 → 0.970" in text
    assert text.endswith("mean of 2 folds")


def _valid_fold(tmp_path) -> Path:
    fold = model_folder(tmp_path / "results", "nnUNetTrainerGreenFP32") / "fold_0"
    write_fold(fold, "nnUNetTrainerGreenFP32", "fp32", "sgd", epoch_s=50.0)
    return fold


def run_report(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI in this process (a subprocess costs seconds here); stdout/stderr as the console shows them."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


@pytest.mark.parametrize("case", ["manifest_other_format", "summary_foreign", "log_foreign"])
def test_foreign_file_in_a_folder_is_a_warning_naming_it(tmp_path, capsys, case):
    fold = _valid_fold(tmp_path)
    if case == "manifest_other_format":
        bad = tmp_path / "compressed" / "m"
        write_compressed(bad, fold.parent, 0.12, 400_000, 2_000_000_000)
        data = json.loads((bad / MANIFEST_FILE).read_text())
        (bad / MANIFEST_FILE).write_text(json.dumps({**data, "format": "nnunet-green-compression/0"}))
        bad = bad / MANIFEST_FILE
    elif case == "summary_foreign":
        bad = fold / GREEN_SUMMARY_FILE
        bad.write_text(json.dumps({"format": "someone-else/3", "energy": 12}))
    else:
        bad = fold / GREEN_LOG_FILE
        bad.write_text("step,loss\n0,0.5\n1,0.4\n")
    proc = run_report(capsys, tmp_path, "-o", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = next(ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ") and str(bad) in ln)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    (row,) = data["training"]["rows"]
    if case == "manifest_other_format":
        assert "'nnunet-green-compression/0'" in warning and "left out" in warning
        assert data["compression"]["rows"] == []
    elif case == "summary_foreign":
        assert "someone-else/3" in warning and f"from {GREEN_LOG_FILE}" in warning
        log = [float(r.split(",")[LOG_COLUMNS.index("epoch_s")]) for r in
               (fold / GREEN_LOG_FILE).read_text().splitlines()[1:]]
        assert row["time_s"] == pytest.approx(sum(log)) and row["precision"] is None
    else:
        assert "no 'epoch' column" in warning
        summary = json.loads((fold / GREEN_SUMMARY_FILE).read_text())
        assert row["time_s"] == pytest.approx(summary["totals"]["time_s"])
        assert "pseudo_dice_per_epoch.png" not in {f["file"] for f in data["training"]["figures"]}


@pytest.mark.parametrize("case", ["manifest_lacks_keys", "manifest_wrong_type", "bench_models_not_a_list",
                                  "summary_other_format", "only_unreadable_manifest"])
def test_unreadable_record_named_on_the_command_line_is_one_error(tmp_path, capsys, case):
    comp = tmp_path / "compressed" / "m"
    write_compressed(comp, tmp_path / "dense", 0.12, 400_000, 2_000_000_000)
    data = json.loads((comp / MANIFEST_FILE).read_text())
    target, expect = comp / MANIFEST_FILE, None
    if case == "manifest_lacks_keys":
        del data["totals"], data["layers"]
        (comp / MANIFEST_FILE).write_text(json.dumps(data))
        expect = "compression.json lacks layers, totals"
    elif case == "manifest_wrong_type":
        (comp / MANIFEST_FILE).write_text(json.dumps({**data, "config": [0.12]}))
        expect = "key 'config' is list, expected an object"
    elif case == "bench_models_not_a_list":
        target = tmp_path / "b" / BENCH_FILE
        target.parent.mkdir()
        target.write_text(json.dumps({"format": BENCH_FORMAT, "models": {"a": 1}}))
        expect = "key 'models' is dict, expected a list"
    elif case == "summary_other_format":
        target = _valid_fold(tmp_path) / GREEN_SUMMARY_FILE
        target.write_text(json.dumps({**json.loads(target.read_text()), "format": "nnunet-green-summary/0"}))
        expect = "'nnunet-green-summary/0'"
    else:
        (comp / MANIFEST_FILE).write_text(json.dumps({**data, "format": "nnunet-green-compression/9"}))
        target, expect = tmp_path / "compressed", "skipped: "
    proc = run_report(capsys, target, "-o", tmp_path / "rep")
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.startswith("nnunet-green-report: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert str(target if case != "only_unreadable_manifest" else comp / MANIFEST_FILE) in proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "rep" / "report.md").exists()


def test_help_lists_exit_codes():
    proc = subprocess.run([str(BIN / "nnunet-green-report"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and EXIT_CODES_HELP in " ".join(proc.stdout.split())


# --- early stopping, data wait, light plans -------------------------------------------------------------------------
LIGHT_PARAMS = 612_345
SCHEDULE = 30  # epochs of the runs that may stop early


def light_folder(root: Path, trainer: str) -> Path:
    return root / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlansGreenLight__3d_fullres"


def _before_data_wait(fold: Path, keep_log_column: bool) -> None:
    """Rewrite a fold as a version before data-wait timing left it: no totals.data_wait_* in the summary and (unless
    `keep_log_column`) no data_wait_s column in green_log.csv."""
    summary = json.loads((fold / GREEN_SUMMARY_FILE).read_text())
    for k in ("data_wait_s", "data_wait_fraction"):
        del summary["totals"][k]
    (fold / GREEN_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if not keep_log_column:
        lines = (fold / GREEN_LOG_FILE).read_text().splitlines()
        i = lines[0].split(",").index("data_wait_s")
        (fold / GREEN_LOG_FILE).write_text("\n".join(",".join(c for j, c in enumerate(ln.split(",")) if j != i)
                                                     for ln in lines) + "\n")


@pytest.fixture(scope="module")
def stop_tree(tmp_path_factory):
    from nnunet_green.training.stopping import StoppingPolicy
    res = tmp_path_factory.mktemp("stop_inputs") / "results"
    s = {
        # stops on a plateau of its EMA pseudo-Dice; 25% of the training time waiting for data
        "plateau": write_fold(model_folder(res, "nnUNetTrainerGreenFP32") / "fold_0", "nnUNetTrainerGreenFP32",
                              "fp32", "sgd", num_epochs=SCHEDULE,
                              policy=StoppingPolicy(patience=3, min_delta=0.03, cooldown=2),
                              data_wait=0.25, epoch_s=40.0, gpu_w=300.0),
        # light plans, same trainer, no policy: the full schedule
        "light": write_fold(light_folder(res, "nnUNetTrainerGreenFP32") / "fold_0", "nnUNetTrainerGreenFP32", "fp32",
                            "sgd", policy=StoppingPolicy(), data_wait=0.05, epoch_s=12.0, gpu_w=200.0, mem=1500.0,
                            params=LIGHT_PARAMS, dice=0.83),
        # an energy budget of 3 epochs of 7500 J: stops after the epoch that leaves less than one more
        "energy": write_fold(model_folder(res, "nnUNetTrainerGreenBF16") / "fold_0", "nnUNetTrainerGreenBF16", "bf16",
                             "sgd", num_epochs=SCHEDULE, policy=StoppingPolicy(budget_kwh=3.2 * 7500 / 3.6e6),
                             data_wait=0.1, epoch_s=30.0, gpu_w=250.0),
        # summary without totals.data_wait_*, log with data_wait_s: the share is computed from the log
        "from_log": write_fold(model_folder(res, "nnUNetTrainerGreenAMP8bit") / "fold_0", "nnUNetTrainerGreenAMP8bit",
                               "amp", "sgd8bit", policy=StoppingPolicy(), data_wait=0.4, epoch_s=20.0),
        # a version before stopping and data-wait timing, and fewer epochs logged than scheduled
        "old": write_fold(model_folder(res, "nnUNetTrainerGreen8bit") / "fold_0", "nnUNetTrainerGreen8bit", "fp32",
                          "sgd8bit", num_epochs=SCHEDULE, epochs_run=EPOCHS, epoch_s=25.0),
    }
    # EpochMeter cannot write an older format; strip what the earlier writers lacked
    _before_data_wait(model_folder(res, "nnUNetTrainerGreenAMP8bit") / "fold_0", keep_log_column=True)
    _before_data_wait(model_folder(res, "nnUNetTrainerGreen8bit") / "fold_0", keep_log_column=False)
    out = tmp_path_factory.mktemp("stop_report")
    assert main([str(res), "-o", str(out)]) == 0
    return {"res": res, "summaries": s, "out": out, "json": json.loads((out / "report.json").read_text()),
            "md": (out / "report.md").read_text(), "html": (out / "report.html").read_text()}


def stop_rows(rep) -> dict:
    return {r["setting"]: r for r in rep["json"]["stopping"]["rows"]}


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def stop_cell(rep, name: str, header: str) -> str:
    return md_cell(section(rep["md"], "Stopping and data loading"), name, header)


def footnote(md_section: str, cell: str, containing: str) -> str:
    """The text of the footnote of `cell` that contains `containing`."""
    for n in re.findall(r"\[(\d+)\]", cell):
        m = re.search(rf"^\[{n}\] (.*?)\s*$", md_section, re.M)
        if m and containing in m.group(1):
            return m.group(1)
    raise AssertionError(f"no footnote with {containing!r} on {cell!r}")


def test_plateau_stop_shows_reason_epoch_and_extrapolated_savings(stop_tree):
    summary = stop_tree["summaries"]["plateau"]
    st = summary["stopping"]
    assert st["reason"] == "plateau" and summary["epochs_logged"] < SCHEDULE  # the policy did stop this run
    log = [r for r in csv_rows(stop_tree["res"], "nnUNetTrainerGreenFP32")]
    trained = len(log)
    assert st["epoch"] == trained - 1
    row = stop_rows(stop_tree)["nnUNetTrainerGreenFP32"]
    assert row["stop_reason"] == "plateau" and row["stop_epoch"] == trained - 1
    assert (row["epochs_trained"], row["epochs_scheduled"], row["epochs_saved"]) == (trained, SCHEDULE,
                                                                                      SCHEDULE - trained)
    # the saving is the mean measured epoch × the epochs not trained: checked against the log, not the record
    mean_s = sum(float(r["epoch_s"]) for r in log) / trained
    mean_j = sum(float(r["energy_j"]) for r in log) / trained
    assert row["time_saved_s"] == pytest.approx(mean_s * (SCHEDULE - trained))
    assert row["energy_saved_j"] == pytest.approx(mean_j * (SCHEDULE - trained))
    assert row["saved_extrapolated"] and "extrapolated" in row["saved_method"]
    stop = stop_cell(stop_tree, "nnUNetTrainerGreenFP32", "Stop")
    assert st["plateau_epoch"] == trained - 3 and st["cooldown_epochs"] == 2
    assert stop.startswith(f"plateau after epoch {trained - 3} (best EMA pseudo-Dice {st['best_ema_pseudo_dice']:.4f}"
                           f" at epoch {st['best_epoch']}); 2 cool-down epochs, stopped after epoch {trained - 1}")
    assert footnote(section(stop_tree["md"], "Stopping and data loading"), stop, "policy: ") == \
        f"policy: {st['policy']}"
    saved = stop_cell(stop_tree, "nnUNetTrainerGreenFP32", "Epochs saved")
    assert saved == f"{SCHEDULE - trained} ({(SCHEDULE - trained) / SCHEDULE:.0%} of the schedule)"
    for header in ("Time saved (extrapolated)", "Energy saved (extrapolated)"):
        cell = stop_cell(stop_tree, "nnUNetTrainerGreenFP32", header)
        assert cell.startswith("≈") and "(extrapolated)" in cell, cell
        note = footnote(section(stop_tree["md"], "Stopping and data loading"), cell, "not measured")
        assert st["full_schedule"]["method"] in note
    minutes = float(re.match(r"≈([\d.]+) min", stop_cell(stop_tree, "nnUNetTrainerGreenFP32",
                                                          "Time saved (extrapolated)")).group(1))
    assert minutes == pytest.approx(row["time_saved_s"] / 60, abs=0.06)
    assert stop_cell(stop_tree, "nnUNetTrainerGreenFP32", "Epochs trained / scheduled") == f"{trained} / {SCHEDULE}"
    # the same fields in the training rows of report.json
    train = {r["setting"]: r for r in stop_tree["json"]["training"]["rows"]}["nnUNetTrainerGreenFP32"]
    assert train["stop_reason"] == "plateau" and train["epochs_saved"] == SCHEDULE - trained
    assert train["stopping"][0]["best_epoch"] == st["best_epoch"]
    assert 'class="est">≈' in stop_tree["html"]


def csv_rows(res: Path, trainer: str) -> list[dict]:
    import csv
    with open(model_folder(res, trainer) / "fold_0" / GREEN_LOG_FILE, newline="") as f:
        return list(csv.DictReader(f))


def test_energy_budget_stop(stop_tree):
    st = stop_tree["summaries"]["energy"]["stopping"]
    assert st["reason"] == "energy_budget" and st["epoch"] == 2
    row = stop_rows(stop_tree)["nnUNetTrainerGreenBF16"]
    assert row["epochs_saved"] == SCHEDULE - 3 == st["full_schedule"]["epochs_saved"]
    assert row["energy_saved_j"] == pytest.approx(st["full_schedule"]["energy_saved_j"])
    assert stop_cell(stop_tree, "nnUNetTrainerGreenBF16", "Stop") == \
        f"energy budget after epoch 2 (budget {3.2 * 7500 / 3.6e6:g} kWh)<sup>[{row_note(stop_tree, 'BF16')}]</sup>"


def row_note(rep, trainer_part: str) -> str:
    """The footnote number on the Stop cell of the row whose name contains `trainer_part`."""
    rows = stop_rows(rep)
    name = next(n for n in rows if trainer_part in n)
    return re.search(r"\[(\d+)\]", stop_cell(rep, name, "Stop")).group(1)


def test_full_schedule_says_so_and_saves_nothing(stop_tree):
    name = "nnUNetTrainerGreenFP32 (nnUNetPlansGreenLight)"
    assert stop_tree["summaries"]["light"]["stopping"]["reason"] == "schedule_complete"
    row = stop_rows(stop_tree)[name]
    assert row["stop_reason"] == "schedule_complete" and row["epochs_saved"] == 0 and not row["saved_extrapolated"]
    assert stop_cell(stop_tree, name, "Stop") == f"full schedule ({EPOCHS} epochs)"
    for header in ("Epochs saved", "Time saved (extrapolated)", "Energy saved (extrapolated)"):
        assert stop_cell(stop_tree, name, header) == "none"


def test_data_wait_share(stop_tree):
    rows, s = stop_rows(stop_tree), stop_tree["summaries"]
    fp32 = rows["nnUNetTrainerGreenFP32"]
    assert fp32["data_wait_fraction"] == pytest.approx(0.25) == pytest.approx(s["plateau"]["totals"]
                                                                              ["data_wait_fraction"])
    assert fp32["data_wait_s"] == pytest.approx(s["plateau"]["totals"]["data_wait_s"])
    assert "green_summary.json" in fp32["data_wait_source"]
    cell = stop_cell(stop_tree, "nnUNetTrainerGreenFP32", "Data wait")
    assert cell.startswith("25.0% (")
    assert rows["nnUNetTrainerGreenFP32 (nnUNetPlansGreenLight)"]["data_wait_fraction"] == pytest.approx(0.05)
    # the summary lacks it: computed from green_log.csv and said so
    amp = rows["nnUNetTrainerGreenAMP8bit"]
    log = csv_rows(stop_tree["res"], "nnUNetTrainerGreenAMP8bit")
    expect = sum(float(r["data_wait_s"]) for r in log) / sum(float(r["train_s"]) for r in log)
    assert amp["data_wait_fraction"] == pytest.approx(expect) == pytest.approx(0.4)
    amp_cell = stop_cell(stop_tree, "nnUNetTrainerGreenAMP8bit", "Data wait")
    assert amp_cell.startswith("40.0%")
    assert GREEN_LOG_FILE in footnote(section(stop_tree["md"], "Stopping and data loading"), amp_cell, "computed")


def test_older_summary_without_stopping_or_data_wait_renders(stop_tree, report):
    """A run of a version before early stopping / data-wait timing: dashes with the reason, never 0."""
    rows = stop_rows(stop_tree)
    old = rows["nnUNetTrainerGreen8bit"]  # 6 of 30 epochs logged, no stopping record, no data_wait_s column
    assert old["stop_reason"] is None and old["epochs_saved"] is None and old["data_wait_fraction"] is None
    sec = section(stop_tree["md"], "Stopping and data loading")
    for header, why in (("Stop", "no stopping record"), ("Epochs saved", "no stopping record"),
                        ("Time saved (extrapolated)", "no stopping record"), ("Data wait", "no data_wait_s column")):
        cell = stop_cell(stop_tree, "nnUNetTrainerGreen8bit", header)
        assert cell.startswith("—<sup>["), (header, cell)
        assert why in footnote(sec, cell, why)
    assert old["missing_reasons"]["data_wait_fraction"].startswith("not recorded")
    # the main fixture's summaries are of that version too, with all scheduled epochs logged: a full schedule,
    # with a footnote saying how that is known; their data_wait_s column is empty
    sec = section(report["md"], "Stopping and data loading")
    for name, folds in (("nnUNetTrainerGreenFP32", ", all 2 folds"), ("nnUNetTrainerGreenBF16", "")):
        cell = md_cell(sec, name, "Stop")
        assert cell.startswith(f"full schedule ({EPOCHS} epochs){folds}<sup>"), cell
        assert "written before early stopping existed" in footnote(sec, cell, "no stopping record")
        assert md_cell(sec, name, "Epochs saved") == "none"
        wait = md_cell(sec, name, "Data wait")
        assert wait.startswith("—<sup>[") and "not timed" in footnote(sec, wait, "data_wait_s is empty")
    rows = {r["setting"]: r for r in report["json"]["stopping"]["rows"]}
    assert rows["nnUNetTrainerGreenFP32"]["epochs_trained"] == 2 * EPOCHS  # two folds, summed
    assert rows["nnUNetTrainerGreenFP32"]["data_wait_fraction"] is None


def test_light_plans_are_their_own_row_beside_the_default(stop_tree):
    train = stop_tree["json"]["training"]["rows"]
    names = [r["setting"] for r in train]
    light, default = "nnUNetTrainerGreenFP32 (nnUNetPlansGreenLight)", "nnUNetTrainerGreenFP32"
    assert names[:2] == [default, light]  # the baseline first, its light-plans run right after it
    rows = {r["setting"]: r for r in train}
    assert rows[light]["plans"] == "nnUNetPlansGreenLight" and rows[default]["plans"] == "nnUNetPlans"
    assert rows[light]["configuration"] == "3d_fullres"
    assert rows[light]["parameters"] == LIGHT_PARAMS and rows[default]["parameters"] == DENSE_PARAMS
    s = stop_tree["summaries"]
    assert rows[light]["time_s"] == pytest.approx(s["light"]["totals"]["time_s"])
    assert rows[light]["energy_j"] == pytest.approx(s["light"]["totals"]["energy_j"])
    assert rows[light]["dice"] == pytest.approx(s["light"]["dice"]["validation_mean_fg_dice"])
    # compared with the default-plans fp32 run, not with itself
    rel = rows[light]["relative_to_baseline"]
    assert rel["baseline"] == default
    assert rel["x_energy"] == pytest.approx(rows[light]["energy_j"] / rows[default]["energy_j"])
    md = section(stop_tree["md"], "Training runs")
    assert md_cell(md, light, "Params") == "612 k" and md_cell(md, default, "Params") == "2.35 M"
    assert re.search(rf"<td( class=\"long\")?>{re.escape(light)}</td>", stop_tree["html"])
    assert light in stop_rows(stop_tree)


def test_setting_names_stay_unique_and_readable(tmp_path):
    from nnunet_green.report.collect import Setting, _setting_name, _unique_names
    ds = tmp_path / "Dataset004_Hippocampus"
    folders = [ds / "nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres",
               ds / "nnUNetTrainerGreenFP32__nnUNetPlansGreenLight__3d_fullres",
               ds / "nnUNetTrainerGreenFP32__nnUNetPlansGreenLight__2d",
               tmp_path / "Dataset005_Prostate" / "nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres"]
    settings = [Setting(_setting_name(f, []), f, []) for f in folders]
    _unique_names(settings)
    assert [s.name for s in settings] == [
        "nnUNetTrainerGreenFP32 (nnUNetPlans, 3d_fullres) [Dataset004_Hippocampus]",
        "nnUNetTrainerGreenFP32 (nnUNetPlansGreenLight, 3d_fullres)",
        "nnUNetTrainerGreenFP32 (nnUNetPlansGreenLight, 2d)",
        "nnUNetTrainerGreenFP32 (nnUNetPlans, 3d_fullres) [Dataset005_Prostate]"]


def test_interrupted_and_unfinished_runs_have_no_saving(tmp_path):
    """An interrupted run (the trainer's record without a stop decision) and a fold without green_summary.json:
    nothing saved to compare, a reason instead of 0."""
    from nnunet_green.report.collect import FoldRun, fold_stopping
    from nnunet_green.report.tables import fmt_stop
    interrupted = FoldRun(tmp_path / "fold_0", {"num_epochs": 100, "epochs_logged": 12, "stopping": {
        "reason": "interrupted", "epoch": 11, "policy": "none (full schedule)"}}, [])
    p = fold_stopping(interrupted)
    assert p["reason"] == "interrupted" and p["epoch"] == 11 and p["epochs_saved"] is None
    assert p["time_saved_s"] is None and "interrupted" in p["missing"]
    assert fmt_stop(p) == "interrupted after epoch 11"
    unfinished = fold_stopping(FoldRun(tmp_path / "fold_1", {}, [{"epoch": 0.0, "epoch_s": 3.0}]))
    assert unfinished["reason"] is None and unfinished["epochs_trained"] == 1
    assert GREEN_SUMMARY_FILE in unfinished["missing"] and "unfinished" in unfinished["missing"]


def test_folds_that_end_differently_are_shown_per_fold(tmp_path):
    from nnunet_green.report.collect import FoldRun, Setting, _stopping
    from nnunet_green.training.stopping import full_schedule_estimate
    rows = [{"epoch": e, "epoch_s": 10.0, "energy_j": 100.0} for e in range(4)]
    stopped = {"reason": "time_budget", "epoch": 3, "time_s": 40.0, "energy_j": 400.0, "budget_hours": 0.0125,
               "policy": "time budget 0.0125 h", "full_schedule": full_schedule_estimate(rows, 4, 10)}
    folds = [FoldRun(tmp_path / "fold_0", {"num_epochs": 10, "epochs_logged": 4, "stopping": stopped}, []),
             FoldRun(tmp_path / "fold_1", {"num_epochs": 10, "epochs_logged": 10, "stopping": {
                 "reason": "schedule_complete", "epoch": 9, "policy": "none (full schedule)"}}, [])]
    s = Setting("x", tmp_path, folds)
    _stopping(s)
    v = s.values
    assert v["stop_reason"] == "time_budget/schedule_complete" and v["stop_epoch"] is None
    assert (v["epochs_trained"], v["epochs_scheduled"], v["epochs_saved"]) == (14, 20, 6)
    assert v["time_saved_s"] == pytest.approx(60.0) and v["energy_saved_j"] == pytest.approx(600.0)
    assert v["saved_extrapolated"] and v["saved_method"].startswith("extrapolated: mean of the 4 measured epochs")
