"""The batch statistics span all ranks (GDPO's normalisation, grpo_global_std's and reinforcepp's batch std and
mean): 2 gloo processes on 127.0.0.1 give exactly the advantages of a single process on the concatenated batch (and
not those of per-rank normalisation)."""

import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepgen_rl.rl.advantages import compute_advantages

WORLD = 2
GROUP = 4
BATCH_TYPES = ("gdpo", "grpo_global_std", "reinforcepp")


def _rank_data(rank: int):
    """Rank-specific rewards [8, 2] (rank 1's reward 0 is on another scale) and validity (one failure on rank 1)."""
    g = torch.Generator().manual_seed(100 + rank)
    rewards = torch.rand(8, 2, generator=g)
    rewards[:, 0] = rewards[:, 0] * (1 + 4 * rank)
    weights = torch.tensor([[1.0, 0.5]] * 4 + [[1.0, 0.0]] * 4)
    valid = torch.ones(8, dtype=torch.bool)
    if rank == 1:
        valid[5] = False
        rewards[5] = float("nan")
    return rewards, weights, valid


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        rewards, weights, valid = _rank_data(rank)
        for adv_type in BATCH_TYPES:
            result = compute_advantages(adv_type, rewards, weights, GROUP, valid=valid, std_floor=0.0,
                                        zero_variance_rtol=0.0, clip=5.0)
            torch.save(result.advantages, Path(out_dir) / f"{adv_type}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(out_dir: Path) -> None:
    context = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError("the 2-rank gloo workers did not finish within 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


@pytest.mark.timeout(180)
def test_batch_statistics_use_all_ranks(tmp_path):
    _run_two_ranks(tmp_path)
    data = [_rank_data(r) for r in range(WORLD)]
    rewards, weights, valid = (torch.cat([d[i] for d in data]) for i in range(3))
    for adv_type in BATCH_TYPES:
        distributed = torch.cat([torch.load(tmp_path / f"{adv_type}_rank{r}.pt") for r in range(WORLD)])
        single = compute_advantages(adv_type, rewards, weights, GROUP, valid=valid, std_floor=0.0,
                                    zero_variance_rtol=0.0, clip=5.0).advantages
        torch.testing.assert_close(distributed, single, rtol=1e-6, atol=1e-6, msg=adv_type)
        assert distributed[8 + 5].item() == 0.0  # the failed sample

        per_rank = torch.cat([compute_advantages(adv_type, *d[:2], GROUP, valid=d[2], std_floor=0.0,
                                                 zero_variance_rtol=0.0, clip=5.0).advantages for d in data])
        assert not torch.allclose(distributed, per_rank, atol=1e-3), adv_type
