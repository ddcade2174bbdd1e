"""What a measurement ran on: CPU model and ISA, cores, GPU, torch threads, library versions, load."""
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
