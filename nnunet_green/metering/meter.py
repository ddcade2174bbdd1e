"""Per-epoch measurement for a training run: `green_log.csv` (one row per epoch) and `green_summary.json`.

File names, the log's columns and the summary record come from `nnunet_green.contract` (GREEN_LOG_FILE,
LOG_COLUMNS, GREEN_SUMMARY_FILE, TrainingSummary), which the report reads through as well.
"""
from __future__ import annotations

import csv
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from nnunet_green import __version__
from nnunet_green.contract import (GREEN_LOG_FILE, GREEN_SUMMARY_FILE, LOG_COLUMNS, SUMMARY_FORMAT, GreenSettings,
                                   TrainingSummary)
from nnunet_green.evaluation.machine import peak_rss_mb, reset_peak_rss
from nnunet_green.metering.carbon import CarbonSetting, carbon_setting
from nnunet_green.metering.distributed import is_writer, node_energy_sum
from nnunet_green.metering.energy import EnergyMeter

MB = 1024 ** 2


class EpochMeter:
    """Measures time, energy, CO2eq and peak memory per epoch, and appends one CSV row per epoch.

    Under DDP each node's leader (local rank 0) reads its node's counters, the nodes are summed
    (`distributed.node_energy_sum`, a collective every rank takes part in) and only the job's rank 0 writes files.
    Missing values are written as empty cells and `null`, never as 0. `settings` (default: from the environment)
    chooses the CPU power estimate and the carbon setting unless `energy` / `carbon` are given.
    """

    def __init__(self, output_folder: str | os.PathLike, device: torch.device, is_node_leader: bool = True,
                 energy: EnergyMeter | None = None, carbon: CarbonSetting | None = None,
                 settings: GreenSettings | None = None):
        self.folder = Path(output_folder)
        self.device = device
        self.is_node_leader = is_node_leader
        self.writes = is_node_leader and is_writer()
        if energy is None or carbon is None:
            settings = settings or GreenSettings.from_env()
        self.energy = energy or EnergyMeter(device, is_node_leader, settings=settings)
        self.carbon = carbon or carbon_setting(settings)
        self.log_path, self.summary_path = self.folder / GREEN_LOG_FILE, self.folder / GREEN_SUMMARY_FILE
        self.phases: dict[str, dict] = {}
        self._rows: list[dict] = []  # this run's epochs (resumed ones included), parsed
        self._epoch = None
        self._overhead = 0.0

    # --- per epoch ---------------------------------------------------------------------------------------------
    def resume(self, next_epoch: int) -> None:
        """Keep the rows of epochs before `next_epoch` (a `--c` run restarts from its checkpoint's epoch)."""
        if not self.writes or not self.log_path.is_file():
            return
        rows = [r for r in read_log(self.log_path) if int(r["epoch"]) < next_epoch]
        self._write_rows(rows)
        self._rows = [{k: _parse(v) for k, v in r.items()} for r in rows]

    def rows(self) -> list[dict]:
        """Per-epoch rows of this run so far (numbers parsed, None where missing)."""
        return list(self._rows)

    def start_epoch(self, epoch: int) -> None:
        t = time.perf_counter()
        self._overhead = 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_peak_rss()
        self._epoch = epoch
        self._val_start = None
        self._energy_start = self.energy.read()
        self._t0 = time.perf_counter()
        self._overhead += self._t0 - t

    def start_validation(self) -> None:
        t = time.perf_counter()
        self._val_start = t
        self._overhead += time.perf_counter() - t

    def end_epoch(self, train_loss=None, val_loss=None, pseudo_dice=None, data_wait_s=None) -> dict:
        """`data_wait_s`: time the training loop spent waiting for batches in this epoch (the rest of `train_s`
        is compute)."""
        t_end = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        gpu_j, cpu_j = node_energy_sum(*_deltas(self.energy.read(), self._energy_start), self.is_node_leader)
        energy_j = None if gpu_j is None and cpu_j is None else (gpu_j or 0.0) + (cpu_j or 0.0)
        val_start = self._val_start if self._val_start is not None else t_end
        cuda = self.device.type == "cuda"
        row = {
            "epoch": self._epoch,
            "epoch_s": t_end - self._t0,
            "train_s": val_start - self._t0,
            "val_s": t_end - val_start,
            "gpu_energy_j": gpu_j,
            "cpu_energy_j": cpu_j,
            "energy_j": energy_j,
            "energy_source": self.energy.source,
            "co2eq_g": self.carbon.co2eq_g(energy_j),
            "gpu_mem_alloc_peak_mb": torch.cuda.max_memory_allocated(self.device) / MB if cuda else None,
            "gpu_mem_reserved_peak_mb": torch.cuda.max_memory_reserved(self.device) / MB if cuda else None,
            "host_rss_peak_mb": peak_rss_mb(),
            "train_loss": _finite_or_none(train_loss),
            "val_loss": _finite_or_none(val_loss),
            "pseudo_dice": _finite_or_none(pseudo_dice),
            "data_wait_s": data_wait_s,
        }
        # Overhead up to here; appending one CSV line afterwards costs microseconds and is not counted.
        row["meter_overhead_s"] = self._overhead + (time.perf_counter() - t_end)
        if self.writes:
            self._append(row)
        self._rows.append(row)
        return row

    @contextmanager
    def measure(self, phase: str):
        """Time and energy of a phase outside the epochs (nnU-Net's final validation), kept for the summary."""
        start, t0 = self.energy.read(), time.perf_counter()
        try:
            yield
        finally:
            gpu_j, cpu_j = node_energy_sum(*_deltas(self.energy.read(), start), self.is_node_leader)
            self.phases[phase] = {"time_s": time.perf_counter() - t0, "gpu_energy_j": gpu_j, "cpu_energy_j": cpu_j,
                                  "energy_j": None if gpu_j is None and cpu_j is None
                                  else (gpu_j or 0.0) + (cpu_j or 0.0)}

    # --- summary -----------------------------------------------------------------------------------------------
    def write_summary(self, extra: dict | None = None) -> dict | None:
        if not self.writes:
            return None
        rows = read_log(self.log_path) if self.log_path.is_file() else []
        column = lambda name: [_parse(r.get(name)) for r in rows]  # noqa: E731
        epoch_s = [v for v in column("epoch_s") if v is not None]
        overhead = sum(v for v in column("meter_overhead_s") if v is not None)
        final_val = self.phases.get("final_validation", {})
        energy_j = _sum_or_none(column("energy_j") + [final_val.get("energy_j")])
        totals = {
            "time_s": sum(epoch_s),
            "train_s": _sum_or_none(column("train_s")),
            "val_s": _sum_or_none(column("val_s")),
            "final_validation_s": final_val.get("time_s"),
            "energy_j": energy_j,
            "energy_kwh": None if energy_j is None else energy_j / 3.6e6,
            "gpu_energy_j": _sum_or_none(column("gpu_energy_j") + [final_val.get("gpu_energy_j")]),
            "cpu_energy_j": _sum_or_none(column("cpu_energy_j") + [final_val.get("cpu_energy_j")]),
            "co2eq_g": self.carbon.co2eq_g(energy_j),
            "energy_source": rows[-1]["energy_source"] if rows else self.energy.source,
            "epochs_without_energy": sum(v is None for v in column("energy_j")),
            "gpu_mem_alloc_peak_mb": _max_or_none(column("gpu_mem_alloc_peak_mb")),
            "gpu_mem_reserved_peak_mb": _max_or_none(column("gpu_mem_reserved_peak_mb")),
            "host_rss_peak_mb": _max_or_none(column("host_rss_peak_mb")),
            "data_wait_s": _sum_or_none(column("data_wait_s")),
            "data_wait_fraction": _fraction(_sum_or_none(column("data_wait_s")), _sum_or_none(column("train_s"))),
            "meter_overhead_s": overhead,
            "meter_overhead_fraction": overhead / sum(epoch_s) if epoch_s and sum(epoch_s) > 0 else None,
        }
        # Known keys of `extra` (e.g. "trainer") land in their TrainingSummary field, the rest in its `extra`.
        summary = TrainingSummary.from_json({
            "format": SUMMARY_FORMAT,
            "nnunet_green_version": __version__,
            "output_folder": str(self.folder),
            "device": str(self.device),
            "gpu_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "epochs_logged": len(rows),
            "totals": totals,
            "energy": self.energy.describe(),
            "carbon": self.carbon.to_dict(),
            **(extra or {}),
        }, str(self.summary_path))
        summary.write(self.summary_path)
        return summary.to_json()

    # --- files -------------------------------------------------------------------------------------------------
    def _append(self, row: dict) -> None:
        new = not self.log_path.is_file()
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in LOG_COLUMNS})

    def _write_rows(self, rows: list[dict]) -> None:
        tmp = self.log_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.log_path)


def read_log(path: str | os.PathLike) -> list[dict]:
    """Rows of a green_log.csv as dicts of strings (empty string = not available)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _deltas(now, start):
    return tuple(None if n is None or s is None else n - s for n, s in zip(now, start))


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _parse(text: str):
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fraction(part, whole):
    return part / whole if part is not None and whole else None


def _sum_or_none(values):
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _max_or_none(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None
