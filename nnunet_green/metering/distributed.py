"""Energy under DDP: every node measured once (by its local rank 0), nodes summed, files written once.

An energy counter (NVML, RAPL) sees the whole node, so only one process per node may read it, and a job on
several nodes must add the nodes up. `node_energy_sum` is a collective: every rank calls it at the same point
(the end of each epoch, the end of the final validation) with what it measured — node leaders their node's
joules, everyone else None — and all ranks get the job's total. Without an initialised process group (or with one
process) it returns its input unchanged.
"""
from __future__ import annotations

import os

import torch


def _group_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def is_node_leader(rank: int) -> bool:
    """Whether this process reads its node's counters: LOCAL_RANK 0 where a launcher sets it (torchrun, multi-node),
    else the given rank (nnU-Net's own `-num_gpus` launcher spawns one node's processes and sets no LOCAL_RANK; its
    trainers call their global rank `local_rank`)."""
    return int(os.environ.get("LOCAL_RANK", rank)) == 0


def is_writer() -> bool:
    """Only the job's global rank 0 writes the meter's files (node leaders on other nodes measure, not write)."""
    if _group_size() == 1:
        return True
    return torch.distributed.get_rank() == 0


def node_energy_sum(gpu_j: float | None, cpu_j: float | None,
                    is_node_leader: bool) -> tuple[float | None, float | None]:
    """(GPU joules, CPU joules) summed over the node leaders of the job. A part that some node could not measure
    is None: an undercount would read as a saving."""
    if _group_size() == 1:
        return gpu_j, cpu_j
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    # gpu joules, nodes with gpu energy, cpu joules, nodes with cpu energy, nodes
    values = [0.0, 0.0, 0.0, 0.0, 1.0 if is_node_leader else 0.0]
    if is_node_leader:
        if gpu_j is not None:
            values[0:2] = [float(gpu_j), 1.0]
        if cpu_j is not None:
            values[2:4] = [float(cpu_j), 1.0]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    gpu_sum, gpu_nodes, cpu_sum, cpu_nodes, nodes = t.tolist()
    return (gpu_sum if 0 < gpu_nodes == nodes else None, cpu_sum if 0 < cpu_nodes == nodes else None)


def from_rank0(value):
    """Rank 0's `value` (anything picklable) on every rank (a collective). A stop decision goes through this whole,
    so that all ranks leave the training loop at the same epoch with the same record, whatever their own view (a
    time or energy budget is measured per rank)."""
    if _group_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
