"""FLOPs of one GRPO step on one rank, by phase: FLOP units (flop_units.py, counted on the real modules) times
the counts the flags and the batch plan (trainer/batching.py) give. Pure arithmetic, no model.

What one rank runs per GRPO step (legend: B prompts, N = B x G images, T denoising steps, T' trained steps,
U actor updates of S = N // U rows, M chunks per update and step, c = 2 CFG branches when --rollout_cfg_scale > 0
else 1, R = U x S x T' trained rows):

    prompt encoding   the LLM + connector on B texts (+ the one CFG negative)            B (+1) x text
    rollout           T x N x c no-grad DiT forwards (ODE steps outside an SDE window too)
    VAE decode        N decodes
    policy forward    R x c DiT forwards with gradients     (+ per chunk the B texts when the text side trains)
    policy recompute  R x c checkpointed recomputes inside the backward (0 without --gradient_checkpointing)
    policy backward   R x c backward passes
    reference forward R x c no-grad forwards of the frozen reference (--beta > 0)
    old-policy fwd    R x c no-grad forwards of DiffusionNFT's old policy
    KL step           --optimizer_step_schedule reference with --beta > 0: the beta x KL backward of its own
                      optimizer step. --kl_forward separate (today): the whole chunk again (forward, reference
                      forward, recompute, backward); shared: only the second backward (recompute + backward)
    SFT-aux           n = ceil(K / W) images (the busiest rank's share of --sftaux_global_batch_size K; a rank
                      with none runs one at weight 0): VAE encode, caption encode, DiT forward + recompute +
                      backward (no CFG)
    EMA / NFT update  elementwise: 3 FLOPs per trained parameter per update (not counted by FlopCounterMode;
                      listed so that it is seen to be negligible)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.sftaux_batch import max_items_per_rank
from .flop_units import FlopUnits

# Phase -> the trainer's phase timer (trainer/step_metrics.PhaseTimer) whose seconds it runs in; the decode moves
# into "rollout" when --stream_rewards decodes each micro-batch inside the rollout.
PHASES = ("prompt_encoding", "rollout", "vae_decode", "policy_forward", "policy_recompute", "policy_backward",
          "reference_forward", "nft_old_forward", "kl_step", "sftaux", "ema", "nft_old_update")
TIMED_IN = {"prompt_encoding": "rollout", "rollout": "rollout", "vae_decode": "decode"}  # every other: "train"
ELEMENTWISE_FLOPS_PER_PARAM = 3  # lerp: a x + (1 - a) y


@dataclass(frozen=True)
class StepCounts:
    """How many of each unit one rank runs per GRPO step (module docstring's legend)."""

    prompts: int  # B
    samples: int  # N
    inference_steps: int  # T
    trained_rows: int  # R = U x S x T'
    train_chunks: int  # U x M x T' chunk objectives (each re-encodes the B texts when the text side trains)
    cfg_branches: int  # c
    reference: bool  # --beta > 0
    kl_forward: str  # "separate" | "shared" (a KL step exists) | "none"
    nft: bool  # --atrain_algorithm diffusionnft
    sftaux_rows: int  # ceil(K / W) SFT-aux items (the busiest rank), 0 without SFT-aux
    text_trains: bool
    ema_updates: int
    stream_rewards: bool

    @property
    def texts(self) -> int:
        """Texts in one prompt encoding: B prompts + the one text-to-image CFG negative."""
        return self.prompts + (1 if self.cfg_branches == 2 else 0)


def kl_forward_mode(args, zero_stage: int = 0) -> str:
    """How the reference schedule's beta x KL step gets its gradient: 'separate' (a fresh chunk forward) or
    'shared' (the policy step's forward, --kl_forward's default); 'none' when no KL step exists. ZeRO-3 runs
    'separate' whatever --kl_forward says (trainer/kl_forward.py ``effective_kl_forward``)."""
    if not (args.optimizer_step_schedule == "reference" and args.beta > 0):
        return "none"
    return "separate" if zero_stage >= 3 else args.kl_forward


def step_counts(args, plan, *, text_trains: bool, sftaux: bool, zero_stage: int = 0) -> StepCounts:
    """The counts of ``args`` (GRPOConfig) and ``plan`` (BatchPlan) on one rank under ZeRO stage ``zero_stage``."""
    trained_rows = plan.actor_update_steps * plan.samples_per_update * plan.num_train_timesteps
    optimizer_steps = plan.optimizer_steps_per_rollout
    every = max(int(getattr(args, "ema_update_every", 1)), 1)
    ema_updates = math.ceil(optimizer_steps / every) if getattr(args, "ema_decay", 0.0) > 0 else 0
    return StepCounts(prompts=plan.prompts_per_rank, samples=plan.samples_per_rank,
                      inference_steps=args.num_inference_steps, trained_rows=trained_rows,
                      train_chunks=plan.actor_update_steps * plan.chunks_per_timestep * plan.num_train_timesteps,
                      cfg_branches=2 if args.rollout_cfg_scale > 0 else 1, reference=args.beta > 0,
                      kl_forward=kl_forward_mode(args, zero_stage), nft=args.atrain_algorithm == "diffusionnft",
                      sftaux_rows=max_items_per_rank(args.sftaux_global_batch_size, plan.world_size) if sftaux else 0,
                      text_trains=text_trains,
                      ema_updates=ema_updates, stream_rewards=bool(getattr(args, "stream_rewards", False)))


def phase_flops(units: FlopUnits, counts: StepCounts) -> dict[str, int]:
    """FLOPs per phase (PHASES order) of one GRPO step on one rank."""
    c, rows = counts.cfg_branches, counts.trained_rows
    dit, text = units.dit_train, units.text_train
    chunk_text = counts.train_chunks * counts.texts if counts.text_trains else 0  # texts re-encoded per chunk
    side_forwards = (units.dit_reference_forward if counts.reference else 0) + (units.dit_forward if counts.nft else 0)
    flops = dict.fromkeys(PHASES, 0)
    flops["prompt_encoding"] = counts.texts * units.text_forward
    flops["rollout"] = counts.inference_steps * counts.samples * c * units.dit_forward
    flops["vae_decode"] = counts.samples * units.vae_decode
    flops["policy_forward"] = rows * c * dit.forward + chunk_text * text.forward
    flops["policy_recompute"] = rows * c * dit.recompute + chunk_text * text.recompute
    flops["policy_backward"] = rows * c * dit.backward + chunk_text * text.backward
    # The reference re-encodes the prompts once per step when the text side trains (its own frozen copy).
    flops["reference_forward"] = (rows * c * units.dit_reference_forward
                                  + (counts.texts * units.text_forward if counts.text_trains else 0)
                                  if counts.reference else 0)
    flops["nft_old_forward"] = rows * c * units.dit_forward if counts.nft else 0
    if counts.kl_forward == "separate":
        flops["kl_step"] = rows * c * (dit.total + side_forwards) + chunk_text * text.total
    elif counts.kl_forward == "shared":
        flops["kl_step"] = rows * c * (dit.recompute + dit.backward) + chunk_text * (text.recompute + text.backward)
    if counts.sftaux_rows:
        caption = text.total if counts.text_trains else units.text_forward
        flops["sftaux"] = counts.sftaux_rows * (units.vae_encode + caption + dit.total)
    flops["ema"] = counts.ema_updates * ELEMENTWISE_FLOPS_PER_PARAM * units.trained_params
    flops["nft_old_update"] = ELEMENTWISE_FLOPS_PER_PARAM * units.trained_params if counts.nft else 0
    return flops


def timer_of(phase: str, stream_rewards: bool) -> str:
    """The PhaseTimer phase whose seconds ``phase`` runs in."""
    if phase == "vae_decode" and stream_rewards:
        return "rollout"
    return TIMED_IN.get(phase, "train")


def flops_by_timer(flops: dict[str, int], stream_rewards: bool) -> dict[str, int]:
    """Phase FLOPs summed per PhaseTimer phase (rollout, decode, train)."""
    out: dict[str, int] = {}
    for phase, value in flops.items():
        out[timer_of(phase, stream_rewards)] = out.get(timer_of(phase, stream_rewards), 0) + value
    return out
