"""nnunet-green-report on input trees written in the exact formats of the trainers, compressor and bench."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from nnunet_green.report.cli import main
from nnunet_green.report.plots import pareto_front

BIN = Path(sys.executable).parent
COLUMNS = ("epoch,epoch_s,train_s,val_s,gpu_energy_j,cpu_energy_j,energy_j,energy_source,co2eq_g,"
           "gpu_mem_alloc_peak_mb,gpu_mem_reserved_peak_mb,host_rss_peak_mb,train_loss,val_loss,pseudo_dice,"
           "meter_overhead_s")
INTENSITY = 380.0  # g/kWh
EPOCHS = 6


def _f(v):
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def write_fold(folder: Path, trainer: str, precision: str, optimizer: str, *, device="cuda:0", source="nvml",
               epoch_s=30.0, gpu_w=250.0, cpu_w=None, mem=4000.0, dice=0.85, validation_dice=True,
               opt_bytes=123_456_789, summary=True, final_val=None) -> dict:
    """A fold folder as nnU-Net + the green meter leave it; returns the totals written."""
    folder.mkdir(parents=True)
    cuda = device.startswith("cuda")
    rows, tot = [], {"time_s": 0.0, "energy_j": None, "gpu": None, "cpu": None}
    for e in range(EPOCHS):
        t = epoch_s * (1.1 if e == 0 else 1.0) + 0.1 * e
        gpu_j = gpu_w * t if (cuda and "nvml" in source) else None
        cpu_j = cpu_w * t if cpu_w is not None else None
        energy = None if gpu_j is None and cpu_j is None else (gpu_j or 0.0) + (cpu_j or 0.0)
        pd = dice * (1 - 0.5 * 0.6 ** e)
        rows.append([e, t, t * 0.9, t * 0.1, gpu_j, cpu_j, energy, source,
                     None if energy is None else energy / 3.6e6 * INTENSITY,
                     mem + e if cuda else None, mem * 1.2 if cuda else None, 2500.0 + e, -0.2 - 0.05 * e,
                     -0.15 - 0.04 * e, pd, 0.002])
        tot["time_s"] += t
        for k, v in (("energy_j", energy), ("gpu", gpu_j), ("cpu", cpu_j)):
            if v is not None:
                tot[k] = (tot[k] or 0.0) + v
    (folder / "green_log.csv").write_text(COLUMNS + "\n" + "".join(",".join(_f(x) for x in r) + "\n" for r in rows))
    if final_val is not None and tot["energy_j"] is not None:
        tot["energy_j"] += final_val
        tot["gpu"] = (tot["gpu"] or 0.0) + final_val
    # what a real nnU-Net fold folder also holds; the report must ignore it
    (folder / "checkpoint_final.pth").write_bytes(b"\x80\x02not a real checkpoint")
    (folder / "progress.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "training_log_2026_1_1_00_00_00.txt").write_text("epoch 0\n")
    (folder / "debug.json").write_text("{}")
    (folder / "validation").mkdir()
    vdice = dice + 0.01 if validation_dice else None
    if validation_dice:
        (folder / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": vdice}}))
    energy_avail = tot["energy_j"] is not None
    s = {"format": "nnunet-green-summary/1", "nnunet_green_version": "0.1.0", "output_folder": str(folder),
         "device": device, "gpu_name": "NVIDIA H100 80GB HBM3" if cuda else None, "epochs_logged": EPOCHS,
         "totals": {"time_s": tot["time_s"], "train_s": tot["time_s"] * 0.9, "val_s": tot["time_s"] * 0.1,
                    "final_validation_s": 12.0 if final_val else None, "energy_j": tot["energy_j"],
                    "energy_kwh": tot["energy_j"] / 3.6e6 if energy_avail else None,
                    "gpu_energy_j": tot["gpu"], "cpu_energy_j": tot["cpu"],
                    "co2eq_g": tot["energy_j"] / 3.6e6 * INTENSITY if energy_avail else None,
                    "energy_source": source, "epochs_without_energy": 0 if energy_avail else EPOCHS,
                    "gpu_mem_alloc_peak_mb": mem + EPOCHS - 1 if cuda else None,
                    "gpu_mem_reserved_peak_mb": mem * 1.2 if cuda else None,
                    "host_rss_peak_mb": 2500.0 + EPOCHS - 1, "meter_overhead_s": 0.012,
                    "meter_overhead_fraction": 0.012 / tot["time_s"]},
         "energy": {"gpu": {"available": cuda and "nvml" in source,
                            "reason": None if cuda else "device is cpu: no GPU energy counter"},
                    "cpu": {"available": cpu_w is not None,
                            "reason": None if cpu_w is not None else
                            "RAPL not readable (/sys/class/powercap/intel-rapl: permission denied); "
                            "set NNUNET_GREEN_CPU_WATTS for an estimate",
                            "estimate_watts": cpu_w}},
         "carbon": {"intensity_g_per_kwh": INTENSITY, "source": "test table", "country": "DEU", "pue": 1.0},
         "trainer": trainer, "precision": precision, "requested_precision": precision, "optimizer": optimizer,
         "initial_lr": 0.01, "optimizer_state_bytes": opt_bytes, "num_parameters": 2_345_678, "num_epochs": EPOCHS,
         "iterations_per_epoch": 250, "val_iterations_per_epoch": 50, "nonfinite_steps_skipped": 0,
         "dice": {"pseudo_dice_last": rows[-1][14], "ema_pseudo_dice_best": dice - 0.02,
                  "validation_mean_fg_dice": vdice}}
    if summary:
        (folder / "green_summary.json").write_text(json.dumps(s, indent=2))
    return s


def model_folder(root: Path, trainer: str) -> Path:
    return root / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans__3d_fullres"


def write_compressed(folder: Path, src: Path, ratio: float, params_after: int, macs_after: int) -> None:
    (folder / "fold_0").mkdir(parents=True)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
    (folder / "plans.json").write_text("{}")
    layers = [{"name": "encoder.stages.0.0.convs.0.conv", "kind": "Conv3d", "in_channels": 1, "out_channels": 32,
               "rank_in": None, "rank_out": None, "params_before": 896, "params_after": 896, "macs_before": 1,
               "macs_after": 1, "rel_error": None, "factorized": False, "reason": "rank would not save"},
              {"name": "encoder.stages.1.0.convs.0.conv", "kind": "Conv3d", "in_channels": 32, "out_channels": 64,
               "rank_in": 8, "rank_out": 8, "params_before": 55360, "params_after": 2304, "macs_before": 9,
               "macs_after": 1, "rel_error": 0.4, "factorized": True, "reason": None}]
    (folder / "compression.json").write_text(json.dumps({
        "format": "nnunet-green-compression/1", "nnunet_green_version": "0.1.0", "created": "2026-01-01T00:00:00",
        "source": {"path": str(src), "checkpoints": {"fold_0/checkpoint_final.pth": "ab" * 32}},
        "config": {"rank_ratio": ratio, "min_rank": 8, "round_to": 8, "half": False},
        "configuration": "3d_fullres", "patch_size": [40, 56, 40], "folds": ["0"], "checkpoint": "checkpoint_final.pth",
        "totals": {"params_before": 2_345_678, "params_after": params_after, "macs_before": 9_000_000_000,
                   "macs_after": macs_after, "decomposition_s": 3.5},
        "layers": layers, "recovery": None}, indent=2))


def write_bench(folder: Path, ref: Path, compressed: list[tuple[Path, float, int, int, float, float]],
                labels=True) -> Path:
    folder.mkdir(parents=True)
    models = [{"name": ref.name, "path": str(ref), "fold": "0", "rank_ratio": None, "params": 2_345_678,
               "macs": 9_000_000_000, "patch_size": [40, 56, 40], "latency_s": {"median": 0.200, "runs": [0.2] * 3},
               "predict_wall_s": 20.0, "dice_vs_labels": 0.86 if labels else None, "agreement_dice": None}]
    for path, ratio, params, macs, lat, agree in compressed:
        models.append({"name": path.name, "path": str(path), "fold": "0", "rank_ratio": ratio, "params": params,
                       "macs": macs, "patch_size": [40, 56, 40], "latency_s": {"median": lat, "runs": [lat] * 3},
                       "predict_wall_s": 15.0, "dice_vs_labels": agree - 0.1 if labels else None,
                       "agreement_dice": agree})
    (folder / "bench.json").write_text(json.dumps({
        "format": "nnunet-green-bench/1", "created": "2026-01-01T00:00:00", "device": "cpu",
        "machine": {"cpu": "test cpu", "gpu": None, "torch_threads": 2, "torch": "2.x"}, "repeats": 3, "warmup": 1,
        "images": "/data/imagesTs", "labels": "/data/labelsTs" if labels else None, "models": models,
        "reference": ref.name}, indent=2))
    return folder / "bench.json"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    res = root / "results"
    fp32 = model_folder(res, "nnUNetTrainerGreenFP32")
    s = {"fp32": [write_fold(fp32 / f"fold_{k}", "nnUNetTrainerGreenFP32", "fp32", "sgd", epoch_s=40.0 + k,
                             gpu_w=300.0, mem=6000.0, dice=0.84 + 0.02 * k, final_val=500.0) for k in (0, 1)]}
    s["amp8"] = write_fold(model_folder(res, "nnUNetTrainerGreenAMP8bit") / "fold_0", "nnUNetTrainerGreenAMP8bit",
                           "amp", "sgd8bit", source="nvml+estimate", epoch_s=20.0, gpu_w=250.0, cpu_w=65.0,
                           mem=3000.0, dice=0.83, opt_bytes=30_000_000)
    s["bf16"] = write_fold(model_folder(res, "nnUNetTrainerGreenBF16") / "fold_0", "nnUNetTrainerGreenBF16", "bf16",
                           "sgd", epoch_s=22.0, gpu_w=260.0, mem=3500.0, dice=0.86)
    # a CPU run on a machine without readable RAPL: energy unavailable
    s["cpu"] = write_fold(model_folder(res, "nnUNetTrainerGreen8bit") / "fold_0", "nnUNetTrainerGreen8bit", "fp32",
                          "sgd8bit", device="cpu", source="unavailable", epoch_s=300.0, gpu_w=None, dice=0.80,
                          validation_dice=False)
    comp = root / "compressed"
    write_compressed(comp / "fp32_r0.12", fp32, 0.12, 400_000, 2_000_000_000)
    write_compressed(comp / "fp32_r0.25", fp32, 0.25, 900_000, 3_500_000_000)
    bench = write_bench(root / "bench_out", fp32, [(comp / "fp32_r0.12", 0.12, 400_000, 2_000_000_000, 0.080, 0.93),
                                                  (comp / "fp32_r0.25", 0.25, 900_000, 3_500_000_000, 0.110, 0.97)])
    return {"root": root, "results": res, "summaries": s, "bench": bench, "fp32": fp32, "compressed": comp}


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


def md_cell(md: str, name: str, header: str) -> str:
    head = next(ln for ln in md.splitlines() if ln.startswith("| Setting |"))
    headers = [c.strip() for c in head.strip("|").split("|")]
    return md_row(md, name)[headers.index(header)]


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


def test_missing_is_dash_with_reason_never_zero(report):
    rows = rows_by_setting(report)
    cpu = rows["nnUNetTrainerGreen8bit"]
    assert cpu["energy_j"] is None and cpu["co2eq_g"] is None and cpu["gpu_mem_alloc_peak_mb"] is None
    assert "RAPL not readable" in cpu["missing_reasons"]["energy_j"]
    for header in ("Energy", "CO2eq", "Peak GPU mem", "Dice/kJ", "×energy"):
        cell = md_cell(report["md"], "nnUNetTrainerGreen8bit", header)
        assert cell.startswith("—<sup>["), (header, cell)
        assert not re.match(r"0(\.0*)?\b", cell)
    # the footnote carries the reason
    n = re.search(r"\[(\d+)\]", md_cell(report["md"], "nnUNetTrainerGreen8bit", "Energy")).group(1)
    assert re.search(rf"^\[{n}\] .*RAPL not readable", report["md"], re.M)
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
    assert set(rows) == {"nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres", "fp32_r0.12", "fp32_r0.25"}
    r12 = rows["fp32_r0.12"]
    assert r12["rank_ratio"] == 0.12 and r12["compressed"]
    assert r12["params_removed_frac"] == pytest.approx(1 - 400_000 / 2_345_678)
    assert r12["macs_ratio"] == pytest.approx(2 / 9)
    assert r12["speedup"] == pytest.approx(0.200 / 0.080)
    assert r12["agreement_dice"] == pytest.approx(0.93)
    assert r12["decomposition_s"] == pytest.approx(3.5)
    assert r12["source_run"] == "nnUNetTrainerGreenFP32"  # joined by path to the training run
    ref = rows["nnUNetTrainerGreenFP32__nnUNetPlans__3d_fullres"]
    assert ref["is_reference"] and ref["display"]["agreement"] == "—"
    assert "2.50× speed-up" in report["md"] and "(−82.9%)" in report["md"]


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


def test_pareto_front():
    pts = [(1.0, 0.8), (2.0, 0.85), (1.5, 0.79), (3.0, 0.84), (0.5, 0.6)]
    assert pareto_front(pts) == [4, 0, 1]


def test_cpu_only_runs_without_energy(tmp_path):
    """This machine's case: no RAPL, no GPU. Energy figures are skipped with a reason; time per epoch instead."""
    res = tmp_path / "results"
    write_fold(model_folder(res, "nnUNetTrainerGreenFP32") / "fold_0", "nnUNetTrainerGreenFP32", "fp32", "sgd",
               device="cpu", source="unavailable", gpu_w=None, epoch_s=100.0)
    write_fold(model_folder(res, "nnUNetTrainerGreenBF16") / "fold_0", "nnUNetTrainerGreenBF16", "bf16", "sgd",
               device="cpu", source="unavailable", gpu_w=None, epoch_s=80.0, dice=0.8, summary=False)
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
    assert proc.returncode != 0
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
