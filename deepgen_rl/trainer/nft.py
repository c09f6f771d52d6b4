"""DiffusionNFT in the trainer (--atrain_algorithm diffusionnft): the old policy, its update, and the chunk loss.

As the official NVlabs implementation (docs/algorithms.md#what-the-reference-trainer-does lists what the DeepGen-RL
reference got
wrong):

* the OLD policy is a separate frozen copy of the trained modules (shared frozen parts, as the KL reference); it
  rolls out (deterministic ODE, independent initial noise per image: a group sharing its noise would give
  identical images) and gives v_old. After each GRPO step it moves toward the trained weights,
  old <- d old + (1 - d) theta, with d = ``rl.nft.old_policy_decay(optimizer steps so far, --nft_decay_type)``.
  Under ZeRO-3 the trained weights are gathered for that update. It is saved in every checkpoint
  (``nft_old_policy.pt``) and restored on resume.
* training draws, per sample, a random permutation of the rollout's T non-zero sigmas and trains the first
  K = int(T x timestep_fraction) of them (column j of the draw is the j-th "timestep" of the optimizer-step
  schedule), each on a FRESH forward noising x_t = (1 - t) x0 + t eps of the final clean latent x0; eps is drawn
  per (GRPO step, global sample index, column) from a seeded stream, so any world size draws the same eps, and a
  re-forward (the reference schedule's KL step) and a resumed run see the same x_t.
* loss: ``rl.nft.nft_loss`` (masked mean over the chunk's valid samples) + --beta x mean (v - v_ref)^2.

Legend: N samples of the rank, K trained columns, T steps, n samples in a chunk, C/h/w latent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from deepgen_rl.core.distributed import SEED_NFT_TRAIN, all_reduce_sum, derive_seed, seeded_generator
from deepgen_rl.model.safe_load import load_weights_only
from deepgen_rl.rl import masked_mean, noised_latents
from deepgen_rl.rl.nft import nft_kl, nft_loss, old_policy_decay
from deepgen_rl.sampling import Conditioning, Trajectory, guided_velocity
from deepgen_rl.sampling.trajectory import Rows

from .objective import ChunkObjective
from .reference_policy import ReferencePolicy

logger = logging.getLogger(__name__)

NFT_STATE_NAME = "nft_old_policy.pt"
_STAT_NAMES = ("positive_loss", "negative_loss", "optimality", "old_deviation", "samples")


@dataclass
class NftDraw:
    """One GRPO step's training draw on this rank. steps: [N, K] sigma indices in 0..T-1 (a random permutation's
    first K per sample); row i's noise of column j comes from the stream (run seed, step, global sample
    first + i, 1 + j) (the last column's is cached): no draw depends on the rank or the world size."""

    steps: Tensor
    keys: tuple[int, int, int]  # (--seed, GRPO step, global index of row 0)
    _cached: dict = field(default_factory=dict)

    def noise(self, column: int, like: Tensor) -> Tensor:
        """[N, C, h, w] fp32 standard normal noise of column ``column`` (the same on every call)."""
        if column not in self._cached:
            seed, step, first = self.keys
            rows = [torch.randn(like.shape[1:], dtype=torch.float32, generator=seeded_generator(
                torch.device("cpu"), derive_seed(seed, SEED_NFT_TRAIN, step, first + i, 1 + column)))
                for i in range(like.shape[0])]
            self._cached = {column: torch.stack(rows).to(like.device)}
        return self._cached[column]


def _gather_own_partitioned_params_in_forward(module: torch.nn.Module) -> None:
    """Hooks gathering ``module``'s own ZeRO-3-partitioned parameters around its forward (no-op without any)."""
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        return
    import deepspeed

    open_contexts = []

    def gather(_module, _inputs):
        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        context.__enter__()
        open_contexts.append(context)

    def release(_module, _inputs, _output):
        open_contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(release)


class NftOldPolicy:
    """The old policy of DiffusionNFT: a frozen copy of the trained modules, its decay schedule and counters."""

    def __init__(self, model: torch.nn.Module, trained_modules, *, decay_type: int, beta: float,
                 adv_clip: float) -> None:
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.policy = ReferencePolicy.frozen_copy(model, trained_modules)  # before deepspeed.initialize (ZeRO-3)
        self.decay_type, self.beta, self.adv_clip = decay_type, beta, adv_clip
        self.optimizer_steps = 0  # applied optimizer steps so far: the schedule's step
        self.updates = 0
        self.last_decay = float("nan")
        self._stats = torch.zeros(len(_STAT_NAMES), dtype=torch.float64)

    @classmethod
    def from_args(cls, model: torch.nn.Module, args, trained_modules) -> Optional["NftOldPolicy"]:
        if args.atrain_algorithm != "diffusionnft":
            return None
        return cls(model, trained_modules, decay_type=args.nft_decay_type, beta=args.nft_beta,
                   adv_clip=args.nft_adv_clip)

    @property
    def rollout_model(self) -> torch.nn.Module:
        return self.policy.module

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "NftOldPolicy":
        """Move the copy beside the policy (after deepspeed.initialize) and, under ZeRO-3, let its forward gather the
        shared top-level parameters (``meta_queries``) that DeepSpeed gathers only inside the LIVE model's forward."""
        self.policy.to(device, dtype)
        _gather_own_partitioned_params_in_forward(self.policy.module)
        return self

    def _old_params(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.policy.module.named_parameters())
        return {name: params[name] for name in self.names}

    # ----- training ---------------------------------------------------------------------------------------

    def draw(self, trajectory: Trajectory, num_columns: int, *, seed: int, step: int, first_sample: int) -> NftDraw:
        """Per-sample random sigma indices [N, K] (K = ``num_columns`` <= T) for GRPO step ``step``; row i is the
        global sample ``first_sample + i`` and draws from its own stream (trainer/global_draws.py)."""
        steps = torch.stack([torch.randperm(trajectory.num_steps, generator=seeded_generator(
            torch.device("cpu"), derive_seed(seed, SEED_NFT_TRAIN, step, first_sample + i, 0)))[:num_columns]
            for i in range(trajectory.num_samples)])
        return NftDraw(steps=steps, keys=(seed, step, first_sample))

    def chunk_objective(self, model: torch.nn.Module, trajectory: Trajectory, draw: NftDraw, column: int, rows: Rows,
                        *, advantages: Tensor, valid: Tensor, beta: float, reference: Optional[ReferencePolicy],
                        reference_conditioning: Optional[Conditioning],
                        conditioning: Optional[Conditioning] = None) -> ChunkObjective:
        """The DiffusionNFT loss of column ``column`` on the samples ``rows`` (advantages / valid: [N] on the
        device; ``conditioning``: the policy's N rows when the text side trains, else the rollout's)."""
        x0_all = trajectory.latents[:, -1]
        x0 = x0_all[rows].contiguous().float()  # [n, C, h, w] the rollout's clean latents
        t = trajectory.sigmas[draw.steps[rows, column]].to(x0.device)  # [n]
        x_t = noised_latents(x0, draw.noise(column, x0_all)[rows], t)
        cfg = trajectory.settings.cfg_scale
        cond = (conditioning if conditioning is not None else trajectory.conditioning).select(rows)
        velocity = guided_velocity(model, x_t, t, cond, cfg)
        old_velocity = self.policy.velocity(x_t, t, trajectory.conditioning.select(rows), cfg)  # the old rolled out
        terms = nft_loss(velocity, old_velocity, x_t, x0, t, advantages[rows], beta=self.beta,
                         adv_clip=self.adv_clip)
        mask = valid[rows]
        policy_term = masked_mean(terms.loss, mask)
        kl_term, kl_value = None, 0.0
        if reference is not None and beta > 0:
            ref_cond = (reference_conditioning if reference_conditioning is not None
                        else trajectory.conditioning).select(rows)
            kl = nft_kl(velocity, reference.velocity(x_t, t, ref_cond, cfg))
            kl_term = beta * masked_mean(kl, mask)
            kl_value = float(masked_mean(kl.detach(), mask))
        self._accumulate(terms, (velocity.detach() - old_velocity).square().flatten(1).mean(1), mask)
        nan = float("nan")  # no importance ratio in DiffusionNFT
        return ChunkObjective(loss=policy_term if kl_term is None else policy_term + kl_term, policy_term=policy_term,
                              kl_term=kl_term, policy_loss=float(policy_term.detach()), kl=kl_value,
                              clip_fraction=0.0, ratio_mean=nan, ratio_max_dev=nan, num_valid=int(mask.sum()))

    def _accumulate(self, terms, old_deviation: Tensor, mask: Tensor) -> None:
        m = mask.detach().to(torch.float64).cpu()
        values = [terms.positive, terms.negative, terms.optimality, old_deviation]
        sums = [float((v.detach().to(torch.float64).cpu() * m).sum()) for v in values]
        self._stats += torch.tensor(sums + [float(m.sum())], dtype=torch.float64)

    # ----- after each GRPO step ---------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: torch.nn.Module, applied_steps: int) -> float:
        """old <- d old + (1 - d) theta with d from the optimizer steps taken so far (this step's included, as the
        official code). Collective under ZeRO-3 (gathers the trained weights). Returns d."""
        self.optimizer_steps += int(applied_steps)
        decay = old_policy_decay(self.optimizer_steps, self.decay_type)
        params = dict(model.named_parameters())
        trained = [params[name] for name in self.names]
        partitioned = [p for p in trained if hasattr(p, "ds_id")]
        import deepspeed  # a dependency; imported here so the pure parts import without initialising it

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            for old, live in zip(self._old_params().values(), trained):
                mixed = old.detach().float() * decay + live.detach().to(old.device).float() * (1.0 - decay)
                old.copy_(mixed.to(old.dtype))
        self.updates += 1
        self.last_decay = decay
        return decay

    def metrics(self, device: torch.device) -> dict[str, float]:
        """The step's NFT statistics over all ranks (collective), then reset."""
        total = all_reduce_sum(self._stats.clone(), device)
        self._stats.zero_()
        count = max(float(total[-1]), 1.0)
        out = {f"nft/{name}": float(total[i]) / count for i, name in enumerate(_STAT_NAMES[:-1])}
        out.update({"nft/old_decay": self.last_decay, "nft/old_updates": float(self.updates)})
        return out

    # ----- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors (CPU) and numbers only: ``torch.load(weights_only=True)`` reads it."""
        return {"params": {name: p.detach().cpu().clone() for name, p in self._old_params().items()},
                "decay_type": self.decay_type, "optimizer_steps": self.optimizer_steps, "updates": self.updates,
                "last_decay": self.last_decay}

    @torch.no_grad()
    def load_checkpoint(self, model: torch.nn.Module, checkpoint_dir: Path, source: str) -> None:
        """Restore the old policy of ``checkpoint_dir``; one saved without it (a GRPO run) restarts it at the
        resumed weights, with a warning. Errors name the file."""
        path = Path(checkpoint_dir) / NFT_STATE_NAME
        if not path.is_file():
            logger.warning("%s holds no DiffusionNFT old policy (%s): it starts at the resumed weights.",
                           checkpoint_dir, NFT_STATE_NAME)
            live = dict(model.named_parameters())
            state = {"params": {name: live[name].detach() for name in self.names}}
        else:
            state = load_weights_only(path, source=source)
            self.optimizer_steps, self.updates = int(state["optimizer_steps"]), int(state["updates"])
            self.last_decay = float(state.get("last_decay", math.nan))
            if state.get("decay_type") != self.decay_type:
                logger.warning("%s was saved with --nft_decay_type %s; continuing with %s.", path,
                               state.get("decay_type"), self.decay_type)
        saved, old = state["params"], self._old_params()
        if set(saved) != set(old):
            raise ValueError(f"{path}: the old policy holds other parameters than this run trains (missing "
                             f"{sorted(set(old) - set(saved))[:5]}): same --trainable_modules / --use_lora?")
        for name, param in old.items():
            param.copy_(saved[name].to(param.device, param.dtype))
