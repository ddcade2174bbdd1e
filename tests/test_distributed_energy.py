"""Energy under DDP with a real torch.distributed process group (gloo, 2 CPU processes): each node counted once,
nodes summed, a node without a counter makes the total missing rather than smaller."""
from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_green.metering.distributed import from_rank0, is_node_leader, is_writer, node_energy_sum

# (local rank, GPU joules, CPU joules) of rank 0 and rank 1, and the total every rank must get
SCENARIOS = [
    # one node, two processes: the node is counted once (rank 1's view of the same counters is ignored)
    ([(0, 100.0, 40.0), (1, 100.0, 40.0)], (100.0, 40.0)),
    # two nodes, one process each: summed
    ([(0, 100.0, 40.0), (0, 250.0, 60.0)], (350.0, 100.0)),
    # two nodes, one without a CPU counter: GPU summed, CPU missing (not 40 J)
    ([(0, 100.0, 40.0), (0, 250.0, None)], (350.0, None)),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        totals = []
        for layout, _ in SCENARIOS:  # one collective per scenario, in the same order on every rank
            local, gpu_j, cpu_j = layout[rank]
            leader = local == 0
            # what a rank's meter reads: node leaders their node's counters, the others nothing
            totals.append(node_energy_sum(gpu_j if leader else None, cpu_j if leader else None, leader))
        # a stop decision: rank 0's record wins on every rank, so all leave the training loop at the same epoch
        # with the same record, whatever their own budget says
        mine = {"reason": "time_budget", "epoch": 7, "rank": rank}
        decided = (from_rank0(mine if rank == 0 else None), from_rank0(mine if rank == 1 else None))
        results[rank] = (totals, is_writer(), decided)
    finally:
        dist.destroy_process_group()


def test_node_energy_is_counted_once_per_node_and_summed_over_nodes():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        totals, writer, decided = results[rank]
        assert totals == [expected for _, expected in SCENARIOS]
        assert writer == (rank == 0)  # files are written once per job
        assert decided == ({"reason": "time_budget", "epoch": 7, "rank": 0}, None)


def test_single_process_is_unchanged():
    assert not dist.is_initialized()
    assert node_energy_sum(5.0, None, is_node_leader=True) == (5.0, None)
    assert is_writer()


def test_node_leader_from_launcher_or_nnunet_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert is_node_leader(0) and not is_node_leader(1)  # nnU-Net's -num_gpus: one node, its rank decides
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_node_leader(4)  # torchrun on a second node: global rank 4 is that node's local rank 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_node_leader(0)
