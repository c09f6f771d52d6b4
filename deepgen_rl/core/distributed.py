"""The one place that talks to torch.distributed: rank, world size, collectives and seed derivation.

Every helper is a no-op / identity on a single process without a process group, so callers never check
``dist.is_initialized()`` themselves. Collectives take the ``device`` the backend needs (CUDA tensors for NCCL,
CPU for gloo) and hand results back on the CPU unless said otherwise.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

# Purposes of derived seeds (keep the numbers: changing one changes every seeded run).
SEED_ROLLOUT = 1
SEED_TRAIN_STEPS = 2
SEED_SFTAUX = 3
SEED_ACTOR_UPDATES = 4
SEED_SDE_WINDOW = 5
SEED_NFT_TRAIN = 14  # DiffusionNFT's per-sample training timesteps and fresh noise (trainer/nft.py)

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group (on exit; torch warns about leaked groups otherwise)."""
    if is_distributed():
        dist.destroy_process_group()


def all_gather_cat(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate (dim 0) the same-shaped ``tensor`` of every rank, in rank order -> on the CPU."""
    if not is_distributed():
        return tensor.detach().cpu()
    local = tensor.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def all_reduce(tensor: torch.Tensor, device, op: Literal["sum", "min", "max"] = "sum", group=None) -> torch.Tensor:
    """Element-wise ``op`` over the ranks of ``group`` (None: all) -> on ``tensor``'s device, ``tensor`` untouched.
    ``device``: where the backend needs the data (None: the CUDA device for an NCCL group, else as it is)."""
    if not is_distributed():
        return tensor.detach()
    if device is None:
        nccl = dist.get_backend(group) == "nccl" and tensor.device.type != "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else tensor.device
    work = tensor.detach().to(device).clone()
    dist.all_reduce(work, op=_OPS[op], group=group)
    return work.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum over ranks -> on the CPU (float64 in, float64 out keeps counts exact)."""
    return all_reduce(tensor.detach().cpu(), device, "sum")


def all_reduce_flag(flag: bool, device, op: Literal["min", "max"]) -> bool:
    """``flag`` combined over ranks (collective): "max" = on any rank, "min" = on every rank."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), device, op).item() > 0)


def derive_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed for (run seed, purpose, step, rank, ...): independent streams that a resumed run
    reproduces exactly, with no generator state to checkpoint."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, purpose, *[int(k) for k in keys]]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator keyed by (seed, rank, batch index, ...): the data samplers' resumable streams."""
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])
