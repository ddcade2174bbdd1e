"""Forward timing that survives a shared machine: interleaved rounds (each round runs every model once, in a
rotating order, so slow drift hits all alike) and CUDA synchronisation around each timed forward."""
from __future__ import annotations

import time
from typing import Callable, Mapping


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(network, x, device, autocast: bool | None = None) -> float:
    """Wall time of one inference forward of `network` on `x` (queued GPU work finished before and after).
    `autocast` (default: on for CUDA) runs fp16 autocast as nnU-Net's predictor does on a GPU."""
    import torch

    device = torch.device(device)
    autocast = device.type == "cuda" if autocast is None else autocast
    with torch.inference_mode(), torch.autocast(device.type, enabled=autocast):
        synchronize(device)
        t0 = time.perf_counter()
        network(x)
        synchronize(device)
        return time.perf_counter() - t0


def interleaved(runs: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 0,
                on_round: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """{name: [seconds of each timed round]}: `warmup` untimed rounds, then `repeats` rounds; round r starts at the
    (r mod n)-th run. Each run returns its own seconds (see forward_seconds). `on_round(r, times)` after each timed
    round (progress logging)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(runs[name]())
        if on_round is not None:
            on_round(r, times)
    return times
