"""The policy-optimisation algorithm flags (issue 14): GRPO, GRPO-Guard and DiffusionNFT.

A dataclass mixin of :class:`deepgen_rl.config.GRPOConfig` (its fields join the GRPOConfig group of ``--help``);
``validate_algorithm_flags`` runs in ``GRPOConfig.__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..rl.nft import NFT_DECAY_TYPES

Algorithm = Literal["grpo", "grpoguard", "diffusionnft"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


@dataclass
class AlgorithmFlags:
    """--atrain_algorithm and the flags of GRPO-Guard and DiffusionNFT."""

    atrain_algorithm: Algorithm = field(
        default="grpo",
        metadata={"help": "'grpo' (Flow-GRPO's clipped ratio of the SDE transition log-probs), 'grpoguard' "
                  "(GRPO-Guard: the normalised log-ratio mean(eps * (mean_theta - mean_old)), exact for every "
                  "sampler; stores the rollout's step means) or 'diffusionnft' (DiffusionNFT: ODE rollouts by a "
                  "separate old policy with independent noise, x0-regression of implicit positive / negative "
                  "policies on a fresh noising of the final latent)."},
    )
    grpoguard_dt_reweight: bool = field(
        default=False,
        metadata={"help": "GRPO-Guard's gradient reweighting: divide each trained step's policy loss by |dt| "
                  "(the paper's second component; off by default)."},
    )
    nft_beta: float = field(
        default=1.0,
        metadata={"help": "DiffusionNFT beta: v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v, loss "
                  "/ beta (official default 1.0; its OCR config 0.1)."},
    )
    nft_adv_clip: float = field(
        default=5.0,
        metadata={"help": "DiffusionNFT advantage clip C: r = clamp(clamp(A, -C, C) / (2 C) + 1/2, 0, 1), loss x C."},
    )
    nft_decay_type: int = field(
        default=1,
        metadata={"help": "DiffusionNFT old-policy update old <- d old + (1 - d) theta after each GRPO step, d from "
                  "the optimizer steps s taken so far (official schedules): 1: min(0.001 s, 0.5); 2: 0 for s < 75, "
                  "then min(0.0075 (s - 75), 0.999); 0: d = 0 (old = theta)."},
    )


def validate_algorithm_flags(args) -> None:
    """ValueError naming the flag; resolves ``--init_same_noise`` (None: True for GRPO / GRPO-Guard as the
    reference, False for DiffusionNFT, whose deterministic ODE rollout would otherwise give identical images)."""
    if args.atrain_algorithm not in ALGORITHMS:
        raise ValueError(f"--atrain_algorithm must be one of {', '.join(ALGORITHMS)}; got {args.atrain_algorithm!r}.")
    if args.nft_decay_type not in NFT_DECAY_TYPES:
        raise ValueError(f"--nft_decay_type must be one of {', '.join(map(str, NFT_DECAY_TYPES))}; got "
                         f"{args.nft_decay_type}.")
    for flag in ("nft_beta", "nft_adv_clip"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be > 0; got {getattr(args, flag)}.")
    nft = args.atrain_algorithm == "diffusionnft"
    if nft and args.init_same_noise:
        raise ValueError("--init_same_noise true cannot be used with --atrain_algorithm diffusionnft: its rollout is a "
                         "deterministic ODE, so a group sharing its initial noise gives identical images and zero "
                         "advantages. Drop --init_same_noise (it defaults to false for diffusionnft).")
    if nft and getattr(args, "sde_window_size", 0):
        raise ValueError("--sde_window_size applies to the SDE samplers of grpo / grpoguard: --atrain_algorithm "
                         "diffusionnft rolls out with the ODE and trains on fresh noisings of the clean image, so "
                         f"there is no window to train; got --sde_window_size {args.sde_window_size}. Drop it.")
    if args.init_same_noise is None:
        args.init_same_noise = not nft
    if args.grpoguard_dt_reweight and args.atrain_algorithm != "grpoguard":
        raise ValueError("--grpoguard_dt_reweight applies to --atrain_algorithm grpoguard only; got "
                         f"--atrain_algorithm {args.atrain_algorithm}.")
