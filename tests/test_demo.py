"""`make demo`, reduced: real Hippocampus cases through every step, then the report's content is checked."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest

from nnunet_green.contract import ENERGY_UNAVAILABLE
from nnunet_green.demo.run import MARKER, Demo, parse_args

from conftest import HIPPOCAMPUS, requires

PNG = b"\x89PNG\r\n\x1a\n"
# one trainer here (the 8-bit ones run through the stock CLI in test_training.py); the demo adds the light run
TRAINERS = ["nnUNetTrainerGreenFP32"]
LIGHT = "nnUNetTrainerGreenFP32 (nnUNetPlansGreenLight)"  # the baseline again, on the lighter planned network


def cpu_energy_source() -> str:
    """What the CPU meter of this machine reports (the demo trains on the CPU)."""
    import torch

    from nnunet_green.metering import EnergyMeter
    meter = EnergyMeter(torch.device("cpu"))
    meter.close()
    return meter.source


@requires(HIPPOCAMPUS)
def test_reduced_demo_end_to_end(tmp_path):
    out = tmp_path / "demo_out"
    proc = subprocess.run([sys.executable, "-m", "nnunet_green.demo", "--data", str(HIPPOCAMPUS), "--out", str(out),
                           "--n-train", "5", "--n-test", "2", "--epochs", "1", "--iters", "2", "--val-iters", "1",
                           "--distill-steps", "2",
                           "--trainers", *TRAINERS], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in proc.stdout
    assert "Report: " in proc.stdout

    report = json.loads((out / "report" / "report.json").read_text())
    has_counter = cpu_energy_source() != ENERGY_UNAVAILABLE
    rows = {row["setting"]: row for row in report["training"]["rows"]}
    assert sorted(rows) == sorted(TRAINERS + [LIGHT])
    assert rows[LIGHT]["parameters"] < 0.5 * rows["nnUNetTrainerGreenFP32"]["parameters"]
    for row in rows.values():
        assert 0 <= row["dice"] <= 1 and row["time_s"] > 0 and row["parameters"] > 1e5
        if has_counter:  # RAPL readable (or an estimate configured): a real number, never 0 for "missing"
            assert row["energy_j"] > 0
        else:  # no counter: missing with its reason, never 0
            assert row["energy_j"] is None and row["missing_reasons"]["energy_j"]

    dense, compressed = report["compression"]["rows"]
    assert compressed["rank_ratio"] == 0.12 and dense["rank_ratio"] is None
    assert compressed["rule"] == "ratio 0.12 calibrated + distilled"  # images at hand: data-aware factors
    assert compressed["recovery"]["kind"] == "distilled" and compressed["recovery"]["steps"] == 2
    assert compressed["params_removed_frac"] > 0.8 and compressed["macs_ratio"] < 0.3
    assert 0 <= compressed["agreement_dice"] <= 1
    assert 0 <= compressed["dice_vs_labels"] <= 1 and 0 <= dense["dice_vs_labels"] <= 1
    assert compressed["latency_s"] > 0 and dense["latency_s"] > 0

    markdown = (out / "report" / "report.md").read_text()
    for trainer in TRAINERS + [LIGHT]:
        assert f"| {trainer} |" in markdown
    dice_cell = re.search(r"\| nnUNetTrainerGreenFP32 \|(?:[^|]*\|){4} ([0-9.]+)", markdown).group(1)
    assert float(dice_cell) == pytest.approx(rows["nnUNetTrainerGreenFP32"]["dice"], abs=1e-4)
    figures = [f["file"] for section in ("training", "compression") for f in report[section]["figures"]]
    assert "radar.png" in figures and len(figures) >= 4
    html = (out / "report" / "report.html").read_text()
    for name in figures:
        data = (out / "report" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
        assert base64.b64encode(data).decode()[:200] in html

    demo = json.loads((out / "demo.json").read_text())
    assert demo["trainers"] == TRAINERS and demo["total_s"] > 0
    assert demo["runs"] == [[TRAINERS[0], "nnUNetPlans"], [TRAINERS[0], "nnUNetPlansGreenLight"]]
    assert (out / MARKER).is_file()


def test_demo_restarts_clean_and_never_deletes_foreign_folders(tmp_path):
    stale = tmp_path / "old_demo"
    (stale / "nnUNet_results").mkdir(parents=True)
    (stale / MARKER).write_text("")
    (stale / "nnUNet_results" / "stale.txt").write_text("from an earlier run")
    Demo(parse_args(["--out", str(stale)])).prepare_output()
    assert not (stale / "nnUNet_results").exists() and (stale / MARKER).is_file()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="not a demo output"):
        Demo(parse_args(["--out", str(foreign)])).prepare_output()
    assert (foreign / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("argv, message", [
    (["--n-train", "3"], "at least 5"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--rank-ratio", "0"], "--rank-ratio"),
    (["--data", "/nonexistent/Task04_X"], "not an MSD task folder"),
])
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
