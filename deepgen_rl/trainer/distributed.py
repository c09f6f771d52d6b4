"""Small collective helpers of the trainer (all no-ops / identities on a single process without a group).

Tensors go through the collective on ``device`` (the engine's device: CUDA tensors for NCCL, CPU for gloo)
and come back on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

# Purposes of derived seeds (keep the numbers: changing one changes every seeded run).
SEED_ROLLOUT = 1
SEED_TRAIN_STEPS = 2
SEED_SFTAUX = 3
SEED_ACTOR_UPDATES = 4


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_cat(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate (dim 0) the same-shaped ``tensor`` of every rank, in rank order -> on the CPU."""
    if not is_distributed():
        return tensor.detach().cpu()
    local = tensor.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum over ranks -> on the CPU (float64 in, float64 out keeps counts exact)."""
    if not is_distributed():
        return tensor.detach().cpu()
    work = tensor.detach().to(device).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.cpu()


def derive_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed for (run seed, purpose, step, rank, ...): independent streams that a resumed run
    reproduces exactly, with no generator state to checkpoint."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, purpose, *[int(k) for k in keys]]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
