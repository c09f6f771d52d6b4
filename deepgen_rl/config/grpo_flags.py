"""The rollout and GRPO-objective flags of :class:`deepgen_rl.config.GRPOConfig` (dataclass mixins: their fields
join the GRPOConfig group of ``--help``; ``GRPOConfig._validate_grpo_flags`` checks them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from ..rl.advantages import AdvantageType
from ..rl.losses import KLType
from ..sampling.steps import LogProbVariant

# The choices of each flag are its Literal type's arguments (one source: the type the field is annotated with).
SdeSampler = Literal["cps_sde", "flow_sde", "dance_sde"]
OptimizerStepSchedule = Literal["reference", "per_timestep", "per_rollout"]
SDE_SAMPLERS: tuple[str, ...] = get_args(SdeSampler)
OPTIMIZER_STEP_SCHEDULES: tuple[str, ...] = get_args(OptimizerStepSchedule)
KlForward = Literal["shared", "separate"]
KL_FORWARDS: tuple[str, ...] = get_args(KlForward)

# Reference defaults for the sampler noise level (docs/algorithms.md#samplers): CPS re-noises x0_hat fully,
# Flow-GRPO uses 0.7, Dance-SDE 1.0 (the reference's shared default; DanceGRPO's own scripts use 0.3).
DEFAULT_SDE_ETA = {"cps_sde": 1.0, "flow_sde": 0.7, "dance_sde": 1.0}

# Flags that no longer exist -> how to convert (config.parse_args stops on them with this, instead of argparse's
# bare "unrecognized arguments").
REMOVED_FLAGS = {
    "sftaux_batch_size": "it counted SFT-aux items per GPU; use --sftaux_global_batch_size, the items per GRPO step "
                         "over all ranks = the old value x NNODES x NGPUS (e.g. 4 per GPU on 8 GPUs = 32, the "
                         "default), so the SFT-aux loss is the same on any world size",
}


def removed_flag_errors(argv: list[str]) -> list[str]:
    """One message per flag of ``argv`` (``--name`` or ``--name=value``) that ``REMOVED_FLAGS`` lists."""
    given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return [f"--{name} was removed: {fix}." for name, fix in REMOVED_FLAGS.items() if name in given]


@dataclass
class RolloutFlags:
    """Batch shape and sampler of the rollout."""

    # --- batch shape ---
    rollout_n: int = field(default=8, metadata={"help": "Images sampled per prompt (the GRPO group size G)."})
    rollout_micro_batch_size: int = field(default=32, metadata={"help": "Images per GPU per rollout forward."})
    atrain_micro_batch_size: int = field(default=32, metadata={"help": "Samples per GPU per training forward/backward."})
    vae_decode_micro_batch_size: int = field(
        default=8,
        metadata={"help": "Images per GPU per VAE decode (rollout, rewards, eval). The SD3.5 VAE decoder's activations "
                  "at 512^2 are ~0.3 GiB per image in bf16, so 8 keeps decode under ~4 GiB (32 at once: ~9-12 GiB)."},
    )
    global_batch_size: int = field(
        default=256,
        metadata={"help": "Images per rollout (GRPO step) over all ranks (prompts x rollout_n); the optimizer steps it "
                  "takes follow --optimizer_step_schedule."},
    )

    # --- sampler ---
    atrain_sde_sampler: SdeSampler = field(
        default="cps_sde",
        metadata={"help": "SDE sampler of rollout and training (log-probs need noise): 'cps_sde' (coefficients-"
                  "preserving), 'flow_sde' (Flow-GRPO) or 'dance_sde' (DanceGRPO, noise std eta sqrt(-dt))."},
    )
    sde_eta: Optional[float] = field(
        default=None,
        metadata={"help": "Sampler noise level eta. Default: 1.0 for cps_sde (reference), 0.7 for flow_sde "
                  "(Flow-GRPO), 1.0 for dance_sde (reference; DanceGRPO's own scripts use 0.3)."},
    )
    logprob_variant: LogProbVariant = field(
        default="reference",
        metadata={"help": "CPS log-prob: 'reference' = -mean (x'-mean)^2 (what the defaults were tuned on); "
                  "'exact' = the Gaussian log-density. Flow-SDE and Dance-SDE always use the exact density."},
    )
    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps T of the rollout."})
    image_height: int = field(default=512, metadata={"help": "Generated image height (pixels)."})
    image_width: int = field(default=512, metadata={"help": "Generated image width (pixels)."})
    rollout_cfg_scale: float = field(
        default=0.0, metadata={"help": "CFG scale in rollout and training; 0 disables CFG (reference)."}
    )
    init_same_noise: Optional[bool] = field(
        default=None,
        metadata={"help": "All images of a prompt's group start from the same initial noise. Default: true "
                  "(reference), false for --atrain_algorithm diffusionnft (which refuses true)."},
    )


@dataclass
class ObjectiveFlags:
    """The GRPO objective: trained timesteps, ratio clip, optimizer steps, advantages, KL and SFT-aux."""

    # --- GRPO objective ---
    timestep_fraction: float = field(
        default=0.6, metadata={"help": "Fraction of the T steps trained per rollout (drawn from 0..T-2)."}
    )
    clip_range: float = field(default=1e-4, metadata={"help": "PPO-style ratio clip range c: ratio in [1-c, 1+c]."})
    clip_range_low: Optional[float] = field(
        default=None,
        metadata={"help": "Signed lower offset of an asymmetric ratio band [1 + low, 1 + high] (e.g. -1e-4); give it "
                  "with --clip_range_high, and the two replace --clip_range."},
    )
    clip_range_high: Optional[float] = field(
        default=None, metadata={"help": "Signed upper offset of the ratio band (e.g. 2e-4); see --clip_range_low."}
    )
    optimizer_step_schedule: OptimizerStepSchedule = field(
        default="reference",
        metadata={"help": "When AdamW steps. 'reference' (the DeepGen-RL reference under its DeepSpeed launch): one "
                  "step after the policy backward of every trained timestep (over all its chunks), one more on the "
                  "beta*KL backward when beta > 0, and one on the SFT-aux backward (61 per rollout at the guide's "
                  "defaults). 'per_timestep': one step per trained timestep (policy + beta*KL together) + SFT-aux. "
                  "'per_rollout': one step per rollout. The LR schedule and warm-up count optimizer steps."},
    )
    kl_forward: KlForward = field(
        default="shared",
        metadata={"help": "Where the beta*KL optimizer step of --optimizer_step_schedule reference (beta > 0) gets its "
                  "gradient. 'shared': from the policy step's own chunk forward, at the weights before the policy "
                  "step (the reference computes both gradients from one forward; one forward per chunk fewer, but "
                  "one gradient-sized buffer more per rank). 'separate': a fresh forward per chunk under the "
                  "weights the policy step left. ZeRO-3 always runs 'separate' (docs/algorithms.md, \"The KL step's "
                  "forward\")."},
    )
    atrain_num_actor_update_steps: int = field(
        default=1,
        metadata={"help": "Split the rollout's samples into N disjoint parts (each block of N consecutive samples "
                  "dealt at random, one to each part, keyed by global sample index) trained one after another over "
                  "the same drawn timesteps (the remainder is dropped and logged); old log-probs are always the "
                  "rollout's."},
    )
    atrain_adv_type: AdvantageType = field(
        default="gdpo",
        metadata={"help": "'gdpo': normalise each reward within the group, then the weighted sum over the batch; "
                  "'grpo': normalise the weighted reward sum within the group; 'grpo_global_std': its group "
                  "mean over the batch std; 'reinforcepp' (REINFORCE++): batch mean and batch std. Batch statistics "
                  "span ALL ranks (the reference uses each rank's own batch)."},
    )
    advantage_clip: float = field(default=5.0, metadata={"help": "Advantages are clipped to [-a, a]."})
    reward_std_floor: float = field(
        default=0.0,
        metadata={"help": "Lower bound on a reward's group std in the advantage (0 = reference: std + 1e-4)."},
    )
    zero_variance_rtol: float = field(
        default=1e-5,
        metadata={"help": "A group whose reward std is <= this x its largest |reward| (+ 1e-6, for rewards near 0) "
                  "is zero-variance: advantage 0 and counted, for grpo, gdpo and grpo_global_std (float noise "
                  "otherwise becomes unit-scale advantages)."},
    )
    beta: float = field(default=5e-7, metadata={"help": "KL penalty coefficient."})
    atrain_kl_type: KLType = field(
        default="v-based", metadata={"help": "KL to the reference policy on the velocity or on the step mean."}
    )
    sftaux_coef: float = field(
        default=1e-4, metadata={"help": "lambda of the convex mix (1 - lambda) L_grpo + lambda L_sft; 0 disables SFT-aux."}
    )
    sftaux_global_batch_size: int = field(default=32, metadata={
        "help": "SFT-aux image-caption items per GRPO step over ALL ranks (one SFT-aux batch per rollout), split "
                "over the ranks; the loss is their mean on any world size. 32 = the reference's 4 per GPU x 8 GPUs "
                "(the guide's run). Replaces --sftaux_batch_size (per GPU): multiply that by NNODES x NGPUS."})
