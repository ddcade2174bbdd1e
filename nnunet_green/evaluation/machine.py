"""What a measurement ran on: CPU model and ISA, cores, GPU, torch threads, library versions, load; this process's
resident memory and its peak (resettable on Linux, so a peak can be taken per epoch or per forward)."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> tuple[str, list[str]]:
    """(model name, the ISA extensions of ISA_FLAGS it has) from /proc/cpuinfo, else platform's guess."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", [f for f in ISA_FLAGS if f in flags]


def machine_info(device=None) -> dict:
    """Machine description written next to every timing (bench.json, benchmark results)."""
    import torch

    import nnunet_green

    device = torch.device("cpu" if device is None else device)
    cpu, isa = cpu_model()
    return {"cpu": cpu, "isa": isa, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "nnunetv2": _version("nnunetv2"), "nnunet_green": nnunet_green.__version__,
            "python": platform.python_version(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def reset_peak_rss() -> None:
    """Restart this process's peak resident memory (VmHWM) from the current RSS; a no-op where Linux's clear_refs
    is unavailable (the peak then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
    except OSError:
        pass


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """This process's resident memory now, MB (None where /proc is unavailable)."""
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float | None:
    """This process's peak resident memory since start or the last `reset_peak_rss()`, MB."""
    peak = _status_mb("VmHWM:")
    if peak is not None:
        return peak
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None
