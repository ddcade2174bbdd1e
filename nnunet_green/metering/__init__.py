"""Shared measurement: energy counters (NVML, RAPL, labelled estimate), carbon intensity, per-epoch meter."""
from nnunet_green.metering.carbon import CarbonSetting, carbon_setting
from nnunet_green.metering.energy import EnergyMeter, EstimatedCpuEnergy, NvmlEnergy, RaplEnergy
from nnunet_green.metering.meter import COLUMNS, LOG_NAME, SUMMARY_NAME, EpochMeter, read_log

__all__ = ["CarbonSetting", "carbon_setting", "EnergyMeter", "EstimatedCpuEnergy", "NvmlEnergy", "RaplEnergy",
           "COLUMNS", "LOG_NAME", "SUMMARY_NAME", "EpochMeter", "read_log"]
