"""Shared measurement: energy counters (NVML, RAPL, labelled estimate), carbon intensity, per-epoch meter.

File names and columns are in `nnunet_green.contract` (GREEN_LOG_FILE, GREEN_SUMMARY_FILE, LOG_COLUMNS).
"""
from nnunet_green.metering.carbon import CarbonSetting, carbon_setting
from nnunet_green.metering.energy import EnergyMeter, EstimatedCpuEnergy, NvmlEnergy, RaplEnergy
from nnunet_green.metering.meter import EpochMeter, read_log

__all__ = ["CarbonSetting", "carbon_setting", "EnergyMeter", "EstimatedCpuEnergy", "NvmlEnergy", "RaplEnergy",
           "EpochMeter", "read_log"]
