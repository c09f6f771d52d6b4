"""The random draws of a GRPO step, each keyed by the GLOBAL position of what it draws (docs/reproducibility.md).

Rank r of W holds the global samples r*N .. r*N + N - 1 of a step (N per rank; prompt b's G samples adjacent), so
a sample's global index does not depend on how many ranks share the batch. Every stream below is keyed by
(run seed, purpose, GRPO step, global index), never by the rank: the same flags, seed and --global_batch_size on
1, 2 or 16 ranks draw the same prompts, noises and parts. The SDE window and the trained timesteps are drawn once
per step for all ranks (sde_window.py).

    prompts         data/prompts.py: prompt i of the step from (seed, step's batch, global prompt index i)
    rollout noise   one stream per sample (sampling/noise.py): its initial noise, then one draw per SDE step
    SFT-aux         sft/aux_data.py: item i of the step's --sftaux_global_batch_size from (seed, batch, global
                    item index i); its VAE sample, noise and t from its own stream; rank r takes a contiguous
                    slice (core/sftaux_batch.py)
    actor updates   blocks of U consecutive global samples dealt at random, one sample of a block per part
    DiffusionNFT    each sample's timesteps and its noise per column from its own streams (nft.py)
"""

from __future__ import annotations

import torch

from deepgen_rl.sampling.noise import SampleNoise

from ..core.distributed import SEED_ACTOR_UPDATES, SEED_ROLLOUT, SEED_SFTAUX, derive_seed, seeded_generator


def sample_seeds(seed: int, purpose: int, step: int, first: int, count: int) -> list[int]:
    """The seeds of the global samples first .. first + count - 1 for ``purpose`` at GRPO step ``step``."""
    return [derive_seed(seed, purpose, step, first + i) for i in range(count)]


def rollout_noise(seed: int, step: int, rank: int, samples_per_rank: int, device: torch.device) -> SampleNoise:
    """The N rollout streams of ``rank`` at GRPO step ``step`` (0-based: the global step before it ran)."""
    return SampleNoise(sample_seeds(seed, SEED_ROLLOUT, step, rank * samples_per_rank, samples_per_rank), device)


def sftaux_noise(seed: int, step: int, first: int, count: int, device: torch.device) -> SampleNoise:
    """The streams of the step's SFT-aux items first .. first + count - 1 (the rank's slice of the global SFT-aux
    batch: core/sftaux_batch.py)."""
    return SampleNoise(sample_seeds(seed, SEED_SFTAUX, step, first, count), device)


def actor_update_generators(seed: int, step: int, rank: int, samples_per_rank: int,
                            num_updates: int) -> list[torch.Generator]:
    """One CPU generator per local block of U consecutive samples, keyed by the global index of its first sample
    (world-size independent when U divides the samples of a rank, which every compared world size must keep)."""
    first = rank * samples_per_rank
    return [seeded_generator(torch.device("cpu"), derive_seed(seed, SEED_ACTOR_UPDATES, step, first + start))
            for start in range(0, samples_per_rank - num_updates + 1, num_updates)]
