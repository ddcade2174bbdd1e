"""Energy counters: NVML (GPU), RAPL (CPU packages), and a labelled estimate from a user-given CPU power.

Every counter has the same small interface: `available`, `reason` (why not, when unavailable) and
`read_j()` — joules accumulated since the counter was created. Counters are read at phase boundaries, so their
overhead is a few syscalls per epoch.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from nnunet_green.contract import ENERGY_UNAVAILABLE, GreenSettings, env_name

CPU_WATTS_ENV = env_name("cpu_watts")  # average CPU package power to estimate with when RAPL is unreadable
RAPL_ROOT = Path("/sys/class/powercap")


class NvmlEnergy:
    """GPU energy from NVML's total-energy counter (mJ since driver load, Volta and newer), as deltas.

    `devices` are torch CUDA indices; they are mapped to NVML handles by UUID because NVML ignores
    CUDA_VISIBLE_DEVICES. Counter deltas, not power sampling: power readings cover only part of the runtime on
    A100/H100.
    """

    def __init__(self, devices: list[int], nvml=None):
        self.available, self.reason, self.names = False, None, []
        self._handles, self._start_mj = [], []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            self._nvml = nvml
            for index in devices:
                handle = _nvml_handle(nvml, index)
                self._handles.append(handle)
                self.names.append(_decode(nvml.nvmlDeviceGetName(handle)))
                self._start_mj.append(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception as error:  # NVMLError_* (no driver, no GPU, counter unsupported), ImportError
            self._handles = []
            self.reason = f"NVML energy counter unavailable: {type(error).__name__}: {error}".rstrip(": ")
            return
        if not self._handles:
            self.reason = "no CUDA device in use"
            return
        self.available = True

    def read_j(self) -> float:
        total_mj = sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) - s
                       for h, s in zip(self._handles, self._start_mj))
        return total_mj / 1000.0


def _nvml_handle(nvml, torch_index: int):
    uuid = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None) if torch.cuda.is_available() else None
    if uuid is not None:
        text = str(uuid)
        return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
    return nvml.nvmlDeviceGetHandleByIndex(torch_index)


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RaplEnergy:
    """CPU package energy from the powercap RAPL counters (`intel-rapl:N/energy_uj`, also used by AMD).

    Counters wrap at `max_energy_range_uj`; a background thread reads them every `poll_s` so that no wrap is
    missed between two epoch boundaries (a package at 100 W wraps about every 40 min).
    """

    def __init__(self, root: Path = RAPL_ROOT, poll_s: float = 30.0):
        self.available, self.reason = False, None
        self._domains = []  # [energy_uj path, max range, last raw value]
        self._total_uj = 0
        self._lock = threading.Lock()
        packages = sorted(p for p in Path(root).glob("intel-rapl:*")
                          if p.name.count(":") == 1 and _read(p / "name", "").startswith("package"))
        if not packages:
            self.reason = f"no RAPL package domains under {root}"
            return
        try:
            for package in packages:
                self._domains.append([package / "energy_uj", int(_read(package / "max_energy_range_uj")),
                                      int(_read(package / "energy_uj"))])
        except PermissionError:
            self._domains = []
            self.reason = (f"RAPL counters under {root} are not readable by this user (root-only since Linux 5.10's "
                           f"PLATYPUS fix); grant read access to energy_uj or set {CPU_WATTS_ENV} for an estimate")
            return
        self.available = True
        if poll_s > 0:
            self._stop = threading.Event()
            threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="rapl-poll").start()

    def _poll(self, poll_s: float):
        while not self._stop.wait(poll_s):
            self.read_j()

    def read_j(self) -> float:
        with self._lock:
            for domain in self._domains:
                path, max_range, last = domain
                now = int(_read(path))
                self._total_uj += now - last if now >= last else now + max_range - last
                domain[2] = now
            return self._total_uj / 1e6

    def close(self):
        if hasattr(self, "_stop"):
            self._stop.set()


def _read(path: Path, default=None) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if default is None:
            raise
        return default


class EstimatedCpuEnergy:
    """Energy = a user-given average CPU power × wall time. Always labelled `estimate`, never `rapl`."""

    def __init__(self, watts: float):
        self.available, self.reason, self.watts = True, None, watts
        self._t0 = time.perf_counter()

    def read_j(self) -> float:
        return (time.perf_counter() - self._t0) * self.watts


class EnergyMeter:
    """Node energy for one training process: GPU (NVML) plus CPU (RAPL, else a labelled estimate, else none).

    Under DDP only the node leader (local rank 0) measures, and it measures every GPU the node uses, so node energy
    is counted once. `cpu_watts` defaults to `settings.cpu_watts` (`settings`: default from the environment).
    """

    def __init__(self, device: torch.device, is_node_leader: bool = True, cpu_watts: float | None = None,
                 nvml=None, rapl_root: Path = RAPL_ROOT, rapl_poll_s: float = 30.0,
                 settings: GreenSettings | None = None):
        if cpu_watts is None:
            cpu_watts = (settings or GreenSettings.from_env()).cpu_watts
        if not is_node_leader:
            self.gpu = _Unavailable("measured once per node by local rank 0")
            self.cpu = _Unavailable("measured once per node by local rank 0")
            return
        if device.type == "cuda":
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1
            indices = list(range(torch.cuda.device_count())) if distributed else \
                [device.index if device.index is not None else torch.cuda.current_device()]
            self.gpu = NvmlEnergy(indices, nvml=nvml)
        else:
            self.gpu = _Unavailable(f"training runs on {device.type}, no GPU to measure")
        rapl = RaplEnergy(rapl_root, poll_s=rapl_poll_s)
        if rapl.available or cpu_watts is None:
            self.cpu = rapl
        else:
            self.cpu = EstimatedCpuEnergy(cpu_watts)
            self.cpu.reason = rapl.reason

    @property
    def source(self) -> str:
        parts = []
        if self.gpu.available:
            parts.append("nvml")
        if self.cpu.available:
            parts.append("estimate" if isinstance(self.cpu, EstimatedCpuEnergy) else "rapl")
        return "+".join(parts) or ENERGY_UNAVAILABLE

    def read(self) -> tuple[float | None, float | None]:
        """(GPU joules, CPU joules) since creation; None for a counter that is not available."""
        return (self.gpu.read_j() if self.gpu.available else None,
                self.cpu.read_j() if self.cpu.available else None)

    def describe(self) -> dict:
        cpu = {"available": self.cpu.available, "reason": self.cpu.reason,
               "estimate_watts": getattr(self.cpu, "watts", None)}
        return {"gpu": {"available": self.gpu.available, "reason": self.gpu.reason,
                        "names": getattr(self.gpu, "names", [])},
                "cpu": cpu}

    def close(self):
        getattr(self.cpu, "close", lambda: None)()


class _Unavailable:
    available = False

    def __init__(self, reason: str):
        self.reason = reason
