"""The meter against a fake NVML counter and a fake RAPL sysfs tree (wrap-around, permission denied)."""
from __future__ import annotations

import json
import pathlib
import time

import pytest
import torch

from nnunet_green.contract import (ENERGY_UNAVAILABLE, ENV_VARS, GREEN_LOG_FILE, GREEN_SUMMARY_FILE, LOG_COLUMNS,
                                   SUMMARY_FORMAT, GreenSettings, SettingsError, TrainingSummary)
from nnunet_green.metering import EnergyMeter, EpochMeter, RaplEnergy, carbon_setting, read_log
from nnunet_green.metering.carbon import CarbonSetting


@pytest.fixture(autouse=True)
def _no_green_settings(monkeypatch):
    # The machine's own nnUNet_green_* values (a CPU power figure, a country) must not change what these tests see.
    for var in ENV_VARS:
        monkeypatch.delenv(var.name, raising=False)


class FakeNvml:
    """Mimics the pynvml calls the meter uses; `counter_mj` is the device's total-energy counter."""

    def __init__(self, counter_mj=1_000_000, fail_init=False):
        self.counter_mj, self.fail_init = counter_mj, fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("handle", uuid)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self.counter_mj


def fake_rapl(root: pathlib.Path, packages: dict[int, int], max_range=1_000_000) -> pathlib.Path:
    for index, value in packages.items():
        package = root / f"intel-rapl:{index}"
        package.mkdir(parents=True)
        (package / "name").write_text(f"package-{index}\n")
        (package / "max_energy_range_uj").write_text(f"{max_range}\n")
        (package / "energy_uj").write_text(f"{value}\n")
        sub = root / f"intel-rapl:{index}:0"  # a sub-domain (core): part of the package, must not be added again
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "max_energy_range_uj").write_text(f"{max_range}\n")
        (sub / "energy_uj").write_text("5\n")
    return root


def set_rapl(root, index, value):
    (root / f"intel-rapl:{index}" / "energy_uj").write_text(f"{value}\n")


GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


def test_nvml_counter_deltas_in_joules(tmp_path):
    nvml = FakeNvml()
    meter = EnergyMeter(GPU, nvml=nvml, rapl_root=tmp_path / "none")
    nvml.counter_mj += 2500
    assert meter.read() == (2.5, None)
    assert meter.source == "nvml"
    assert meter.describe()["gpu"]["names"] == ["Fake GPU"]


def test_nvml_missing_gives_reason_not_zero(tmp_path):
    meter = EnergyMeter(GPU, nvml=FakeNvml(fail_init=True), rapl_root=tmp_path / "none")
    assert meter.read() == (None, None)
    assert meter.source == "unavailable"
    assert "NVML Shared Library Not Found" in meter.describe()["gpu"]["reason"]


def test_real_pynvml_is_either_a_counter_or_a_reason(tmp_path):
    # Without a driver (this CPU machine) the real pynvml must give a reason, not crash and not report 0 J; with a
    # GPU the counter must be read and named.
    meter = EnergyMeter(GPU, rapl_root=tmp_path / "none")
    gpu_j, cpu_j = meter.read()
    assert cpu_j is None
    if meter.gpu.available:
        time.sleep(0.2)
        assert meter.gpu.reason is None and meter.describe()["gpu"]["names"]
        assert meter.source == "nvml" and gpu_j is not None and meter.read()[0] >= gpu_j >= 0
    else:
        assert meter.gpu.reason and gpu_j is None and meter.source == ENERGY_UNAVAILABLE


def test_rapl_sums_packages_ignores_subdomains_and_handles_wrap(tmp_path):
    root = fake_rapl(tmp_path, {0: 999_000, 1: 10_000})
    rapl = RaplEnergy(root, poll_s=0)
    assert rapl.available
    set_rapl(root, 0, 4_000)   # wrapped: 1_000 to the max, then 4_000 more
    set_rapl(root, 1, 15_000)
    assert rapl.read_j() == pytest.approx((1_000 + 4_000 + 5_000) / 1e6)
    set_rapl(root, 0, 6_000)
    assert rapl.read_j() == pytest.approx((10_000 + 2_000) / 1e6)


def test_rapl_permission_denied_is_a_reason(tmp_path, monkeypatch):
    root = fake_rapl(tmp_path, {0: 1})
    real_read_text = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):  # what a non-root user sees since the PLATYPUS fix
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    meter = EnergyMeter(CPU, rapl_root=root)
    assert not meter.cpu.available and "not readable" in meter.cpu.reason
    assert meter.read() == (None, None) and meter.source == "unavailable"
    # With a user-given CPU power the CPU energy becomes an estimate, labelled as such.
    estimated = EnergyMeter(CPU, rapl_root=root, cpu_watts=50.0)
    assert estimated.source == "estimate"
    assert estimated.read()[1] >= 0 and "not readable" in estimated.describe()["cpu"]["reason"]


def test_estimate_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_green_cpu_watts", raising=False)
    assert EnergyMeter(CPU, rapl_root=tmp_path).source == "unavailable"
    monkeypatch.setenv("nnUNet_green_cpu_watts", "65")
    meter = EnergyMeter(CPU, rapl_root=tmp_path)
    assert meter.source == "estimate" and meter.describe()["cpu"]["estimate_watts"] == 65.0


def test_gpu_and_rapl_together(tmp_path):
    root = fake_rapl(tmp_path, {0: 0})
    nvml = FakeNvml()
    meter = EnergyMeter(GPU, nvml=nvml, rapl_root=root, rapl_poll_s=0)
    nvml.counter_mj += 1000
    set_rapl(root, 0, 500_000)
    assert meter.source == "nvml+rapl"
    assert meter.read() == (pytest.approx(1.0), pytest.approx(0.5))


def test_non_leader_rank_measures_nothing(tmp_path):
    meter = EnergyMeter(GPU, is_node_leader=False, nvml=FakeNvml(), rapl_root=fake_rapl(tmp_path, {0: 0}))
    assert meter.read() == (None, None) and "local rank 0" in meter.gpu.reason


def test_carbon_settings(monkeypatch):
    assert carbon_setting({}).country == "WORLD"
    de = carbon_setting({"nnUNet_green_country": "de", "nnUNet_green_pue": "1.5"})
    assert (de.country, de.intensity_g_per_kwh, de.pue) == ("DEU", 380.95, 1.5)
    assert de.co2eq_g(3.6e6) == pytest.approx(380.95 * 1.5)
    assert de.co2eq_g(None) is None
    user = carbon_setting({"nnUNet_green_carbon_intensity": "20"})
    assert user.intensity_g_per_kwh == 20 and "user" in user.source
    assert user.country is None  # the default country is not recorded as the user's choice
    assert carbon_setting({"nnUNet_green_carbon_intensity": "20", "nnUNet_green_country": "pl"}).country == "PL"
    with pytest.raises(SettingsError, match="not in the bundled table"):
        carbon_setting({"nnUNet_green_country": "ATLANTIS"})
    with pytest.raises(SettingsError, match="nnUNet_green_pue must be a positive number"):
        carbon_setting({"nnUNet_green_pue": "nan"})
    # The settings object and the environment give the same answer.
    monkeypatch.setenv("nnUNet_green_country", "USA")
    assert carbon_setting() == carbon_setting(GreenSettings(country="USA")) == carbon_setting({"nnUNet_green_country": "US"})


def test_bad_cpu_watts_is_a_settings_error(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_green_cpu_watts", "-3")
    with pytest.raises(SettingsError, match="nnUNet_green_cpu_watts must be a positive number, got '-3'"):
        EnergyMeter(CPU, rapl_root=tmp_path)
    # An explicit settings object wins over the environment.
    assert EnergyMeter(CPU, rapl_root=tmp_path, settings=GreenSettings(cpu_watts=10.0)).source == "estimate"


def run_epochs(meter, nvml, epochs, joules_per_epoch=10.0):
    rows = []
    for epoch in epochs:
        meter.start_epoch(epoch)
        nvml.counter_mj += joules_per_epoch * 1000
        meter.start_validation()
        rows.append(meter.end_epoch(train_loss=-0.5, val_loss=-0.4, pseudo_dice=float("nan")))
    return rows


def test_epoch_log_summary_and_resume(tmp_path):
    nvml = FakeNvml()
    carbon = CarbonSetting(400.0, "test", "XXX", pue=1.0)
    meter = EpochMeter(tmp_path, CPU, energy=EnergyMeter(GPU, nvml=nvml, rapl_root=tmp_path / "none"),
                       carbon=carbon)
    run_epochs(meter, nvml, range(3))
    rows = read_log(tmp_path / GREEN_LOG_FILE)
    assert tuple(rows[0]) == LOG_COLUMNS
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert all(float(r["energy_j"]) == 10.0 and r["energy_source"] == "nvml" for r in rows)
    assert float(rows[0]["co2eq_g"]) == pytest.approx(10 / 3.6e6 * 400)
    assert rows[0]["pseudo_dice"] == ""           # NaN Dice is "not available", never 0
    assert rows[0]["cpu_energy_j"] == "" and rows[0]["gpu_mem_alloc_peak_mb"] == ""
    assert float(rows[0]["host_rss_peak_mb"]) > 10

    # `--c` from the checkpoint of epoch 2: epoch 2 is rerun, its old row must not be duplicated.
    resumed = EpochMeter(tmp_path, CPU, energy=EnergyMeter(GPU, nvml=nvml, rapl_root=tmp_path / "none"),
                         carbon=carbon)
    resumed.resume(2)
    run_epochs(resumed, nvml, range(2, 4), joules_per_epoch=20.0)
    rows = read_log(tmp_path / "green_log.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    with resumed.measure("final_validation"):
        nvml.counter_mj += 5000
    summary = resumed.write_summary({"trainer": "T"})
    assert summary["totals"]["energy_j"] == pytest.approx(10 + 10 + 20 + 20 + 5)
    assert summary["totals"]["co2eq_g"] == pytest.approx(65 / 3.6e6 * 400)
    assert summary["totals"]["cpu_energy_j"] is None
    assert summary["trainer"] == "T" and summary["epochs_logged"] == 4
    assert json.loads((tmp_path / GREEN_SUMMARY_FILE).read_text()) == summary
    record = TrainingSummary.read(tmp_path / GREEN_SUMMARY_FILE)
    assert summary["format"] == SUMMARY_FORMAT and record.trainer == "T" and record.epochs_logged == 4
    assert record.totals["energy_source"] == "nvml" and record.carbon["intensity_g_per_kwh"] == 400.0
