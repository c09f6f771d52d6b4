"""Every flag of DeepGen-RL, with its default, in one place.

Six groups are parsed together by :func:`parse_args` with ``transformers.HfArgumentParser``:

* :class:`GRPOConfig` -- a ``transformers.TrainingArguments`` with the GRPO, sampling and eval flags;
* :class:`ModelArguments` -- where the weights live and which modules train;
* :class:`DataArguments` -- dataset YAMLs;
* :class:`RewardArguments` -- the reward servers and their timeouts / retries;
* :class:`JudgeArguments` -- the UniGenBench judge server and its own timeouts / retries;
* :class:`EvalArguments` -- how much a UniGenBench evaluation covers and how long it may take (the trainer's
  periodic evaluation and ``python -m deepgen_rl.eval``).

Defaults follow the user guide (TRAINING_GUIDE.md, section 5) and the reference semantics of
DESIGN.md section 4. Model paths and server URLs default to the environment variables the guide names,
read once here (when a dataclass or the parser is built) and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from transformers import HfArgumentParser, TrainingArguments

from .algorithm_config import AlgorithmFlags, validate_algorithm_flags
from .deepspeed_json import read_deepspeed_json
from .rewards.scorer_flags import SCORER_URL_FLAGS, ScorerUrlArguments
from .judge_flags import JudgeRewardFlags, SleepSwitchFlags
from .rl.advantages import AdvantageType
from .rl.losses import KLType, clip_band
from .rl.timesteps import num_train_steps, num_window_train_steps, sde_window_range
from .sampling.rollout import check_sde_eta
from .sampling.steps import LogProbVariant
from .trainer_flags import HELP_EPILOG, GroupedArgumentParser, refused_flag_errors

SD3_ENV = "SD3_5_MODEL_NAME_OR_PATH"
QWEN_ENV = "QWEN2_5_VL_MODEL_NAME_OR_PATH"
CLIP_ENV = "CLIP_MODEL_NAME_OR_PATH"
CHECKPOINT_ENV = "CHECKPOINT"

DEFAULT_OCR_PORT = 18082
DEFAULT_UNIFIEDREWARD_PORT = 18087
DEFAULT_UNIGENBENCH_PORT = 8000
DEFAULT_EDIT_JUDGE_PORT = 18089

# The choices of each flag are its Literal type's arguments (one source: the type the field is annotated with).
SdeSampler = Literal["cps_sde", "flow_sde", "dance_sde"]
TrainableModuleSet = Literal["dit", "dit_connector", "dit_connector_llm"]
ModelDtype = Literal["auto", "bfloat16", "float16", "float32"]
OptimizerStepSchedule = Literal["reference", "per_timestep", "per_rollout"]
SDE_SAMPLERS: tuple[str, ...] = get_args(SdeSampler)
ADVANTAGE_TYPES: tuple[str, ...] = get_args(AdvantageType)
KL_TYPES: tuple[str, ...] = get_args(KLType)
LOGPROB_VARIANTS: tuple[str, ...] = get_args(LogProbVariant)
TRAINABLE_MODULE_SETS: tuple[str, ...] = get_args(TrainableModuleSet)
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
OPTIMIZER_STEP_SCHEDULES: tuple[str, ...] = get_args(OptimizerStepSchedule)

# Reference defaults for the sampler noise level (DESIGN.md section 4): CPS re-noises x0_hat fully,
# Flow-GRPO uses 0.7, Dance-SDE 1.0 (the reference's shared default; DanceGRPO's own scripts use 0.3).
DEFAULT_SDE_ETA = {"cps_sde": 1.0, "flow_sde": 0.7, "dance_sde": 1.0}


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _env_field(env_name: str, default: str, help_text: str):
    return field(
        default_factory=lambda: _env(env_name, default),
        metadata={"help": f"{help_text} Default: ${env_name}" + (f", else {default}." if default else ".")},
    )


def _check_choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--{flag} must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def _check_range(flag: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"--{flag} must be in {bracket}{low}, {high}]; got {value}.")


def _check_positive(flag: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"--{flag} must be a positive integer; got {value}.")


@dataclass
class ModelArguments:
    """Where the DeepGen weights are and which parts of the model train."""

    sd3_model_name_or_path: str = _env_field(
        SD3_ENV, "", "Local diffusers folder of the SD3.5-Medium-Kontext model (transformer/, vae/, scheduler/)."
    )
    qwen2_5_vl_model_name_or_path: str = _env_field(
        QWEN_ENV, "", "Local transformers folder of Qwen2.5-VL-3B-Instruct (config, weights, tokenizer)."
    )
    clip_model_name_or_path: str = _env_field(
        CLIP_ENV, "", "Local transformers folder of the CLIP model used by the clip_sim reward."
    )
    checkpoint: str = _env_field(
        CHECKPOINT_ENV,
        "",
        "DeepGen_Image pretraining checkpoint (.pth with the reference key names) loaded on top of the model "
        "paths. Empty: keep the freshly initialised connector (only sensible for tiny test models).",
    )
    num_queries: int = field(default=128, metadata={"help": "Number of learnable meta queries appended to the prompt."})
    num_fusion_layers: int = field(
        default=6,
        metadata={"help": "How many LLM hidden states (layers L-1, L-7, L-13, ...) are concatenated for the connector."},
    )
    connector_hidden_size: int = field(default=2048, metadata={"help": "Connector (SigLIP-style encoder) width."})
    connector_intermediate_size: int = field(default=11946, metadata={"help": "Connector MLP width."})
    connector_num_layers: int = field(default=6, metadata={"help": "Connector encoder layers."})
    connector_num_heads: int = field(default=32, metadata={"help": "Connector attention heads."})
    max_prompt_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (longer prompts are cut)."})
    trainable_modules: TrainableModuleSet = field(
        default="dit",
        metadata={
            "help": "What GRPO updates: 'dit' (the SD3 transformer only, as the reference), 'dit_connector' "
            "(+ connector, projectors, meta queries) or 'dit_connector_llm' (+ the Qwen2.5-VL language model)."
        },
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the DiT attention instead of its full weights (reference = adapters off)."},
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank when --use_lora."})
    lora_alpha: float = field(default=128.0, metadata={"help": "LoRA alpha when --use_lora."})
    checkpoint_llm_lora_alpha: float = field(
        default=128.0,
        metadata={"help": "Alpha of an LLM LoRA found in CHECKPOINT (merged into the LLM weights at load; rank is read "
                  "from the tensors)."},
    )
    model_dtype: ModelDtype = field(
        default="auto",
        metadata={"help": "Weight dtype of the frozen parts and the rollout. 'auto': bfloat16 on GPU, float32 on CPU."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel of the Qwen2.5-VL model."})

    def __post_init__(self) -> None:
        for flag in ("num_queries", "num_fusion_layers", "connector_hidden_size", "connector_intermediate_size",
                     "connector_num_layers", "connector_num_heads", "max_prompt_length", "lora_rank"):
            _check_positive(flag, getattr(self, flag))
        _check_choice("trainable_modules", self.trainable_modules, TRAINABLE_MODULE_SETS)
        _check_choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        if self.connector_hidden_size % self.connector_num_heads:
            raise ValueError(
                f"--connector_hidden_size ({self.connector_hidden_size}) must be divisible by "
                f"--connector_num_heads ({self.connector_num_heads})."
            )


@dataclass
class DataArguments:
    """Training, evaluation and SFT-aux datasets."""

    dataset_config: str = _env_field(
        "DATASET_CONFIG", "assets/rl_datasets/deepgen/deepgen_train.yaml", "Training dataset YAML (prompts + rewards)."
    )
    eval_dataset_config: str = _env_field(
        "EVAL_DATASET_CONFIG", "assets/rl_datasets/deepgen/eval/eval.yaml", "Evaluation dataset YAML (UniGenBench)."
    )
    sftaux_dataset_config: str = _env_field(
        "SFTAUX_DATASET_CONFIG",
        "deepgen_rl/sft/configs/datasets/deepgen/t2i_grpo_moretextdata.py",
        "MMEngine config of the SFT-aux dataset.",
    )


def _check_client_flags(prefix: str, args) -> None:
    """The timeout / retry flags of a client group (``--{prefix}_timeout`` ...): (name, bound, bound allowed)."""
    for name, low, closed in (("timeout", 0, False), ("health_timeout", 0, False), ("retry_backoff", 0, True),
                              ("max_retries", 0, True), ("max_concurrency", 1, True)):
        value = getattr(args, f"{prefix}_{name}")
        if value < low or (value == low and not closed):
            raise ValueError(f"--{prefix}_{name} must be {'>=' if closed else '>'} {low}; got {value}.")


def _check_urls(args, *flags: str) -> None:
    for flag in flags:
        url = getattr(args, flag)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--{flag} must be an http(s):// URL; got {url!r}.")


@dataclass
class RewardArguments(JudgeRewardFlags, ScorerUrlArguments):
    """The reward servers of training and how hard to try (one request: a batch of images, or one image pair)."""

    ocr_url: str = _env_field("OCR_URL", f"http://localhost:{DEFAULT_OCR_PORT}", "OCR reward server.")
    unifiedreward_think_url: str = _env_field(
        "UNIFIEDREWARD_THINK_URL", f"http://localhost:{DEFAULT_UNIFIEDREWARD_PORT}",
        "vLLM server (OpenAI API) of UnifiedReward-Think.",
    )
    unifiedreward_model_name: str = field(
        default="UnifiedReward", metadata={"help": "Served model name of UnifiedReward-Think on its vLLM server."}
    )
    reward_timeout: float = field(default=300.0, metadata={"help": "Seconds before one reward request is abandoned."})
    reward_max_retries: int = field(default=3, metadata={"help": "Retries of a failed reward request (then reported)."})
    reward_max_concurrency: int = field(default=64, metadata={"help": "Reward requests in flight at once per rank."})
    reward_request_batch_size: int = field(default=16, metadata={
        "help": "Images per request to batched servers (OCR, pickscore, hpsv2, image_reward, aesthetic)."})
    reward_retry_backoff: float = field(default=1.0, metadata={
        "help": "Seconds before the first retry of a failed reward request; doubles per retry, capped at 30 s."})
    reward_health_timeout: float = field(default=30.0, metadata={
        "help": "Seconds to wait at start-up for each reward server's /health before failing with how to start it."})
    unifiedreward_max_tokens: int = field(
        default=4096, metadata={"help": "max_tokens of one UnifiedReward-Think reply (its <think> reasoning is long)."}
    )
    # The edit_vlm_judge reward (edit datasets): rewards/edit_judge.py.
    edit_judge_url: str = _env_field("EDIT_JUDGE_URL", f"http://localhost:{DEFAULT_EDIT_JUDGE_PORT}",
                                     "vLLM server (OpenAI API) of the image-editing judge (edit_vlm_judge reward).")
    edit_judge_model_name: str = field(
        default="EditJudge", metadata={"help": "Served model name of the edit judge on its vLLM server."})
    edit_judge_max_tokens: int = field(
        default=2048, metadata={"help": "max_tokens of one edit judge reply (reasoning, then <score>X</score>)."})

    def __post_init__(self) -> None:
        _check_client_flags("reward", self)
        for flag in ("reward_request_batch_size", "unifiedreward_max_tokens", "edit_judge_max_tokens"):
            _check_positive(flag, getattr(self, flag))
        _check_urls(self, "ocr_url", "unifiedreward_think_url", "edit_judge_url", *SCORER_URL_FLAGS)
        self.check_judge_flags()


@dataclass
class JudgeArguments:
    """The UniGenBench judge of evaluation (a vLLM server; one request per image) and how hard to try."""

    unigenbench_api_url: str = _env_field(
        "UNIGENBENCH_API_URL", f"http://localhost:{DEFAULT_UNIGENBENCH_PORT}",
        "vLLM server (OpenAI API) of the UniGenBench judge.",
    )
    unigenbench_model_name: str = _env_field(
        "UNIGENBENCH_MODEL_NAME", "UniGenBench-EvalModel-qwen3vl-32b-v1", "Served model name of the UniGenBench judge."
    )
    unigenbench_max_tokens: int = field(
        default=4096, metadata={"help": "max_tokens of one UniGenBench judge reply (per-test-point analysis, then scores)."}
    )
    judge_timeout: float = field(default=300.0, metadata={"help": "Seconds before one judge request is abandoned."})
    judge_max_retries: int = field(default=3, metadata={"help": "Retries of a failed judge request (then reported)."})
    judge_max_concurrency: int = field(default=64, metadata={"help": "Judge requests in flight at once per rank."})
    judge_retry_backoff: float = field(default=1.0, metadata={
        "help": "Seconds before the first retry of a failed judge request; doubles per retry, capped at 30 s."})
    judge_health_timeout: float = field(default=30.0, metadata={
        "help": "Seconds to wait for the judge's /health (at start-up and before each evaluation)."})

    def __post_init__(self) -> None:
        _check_client_flags("judge", self)
        _check_positive("unigenbench_max_tokens", self.unigenbench_max_tokens)
        _check_urls(self, "unigenbench_api_url")


@dataclass
class EvalArguments(SleepSwitchFlags):
    """UniGenBench evaluation (deepgen_rl/eval/): prompts covered, sample images kept, time allowed."""

    eval_timeout: float = field(
        default=3600.0,
        metadata={"help": "Seconds one periodic evaluation may take before ranks give up waiting (0: no limit)."},
    )
    eval_max_prompts: int = field(
        default=0,
        metadata={"help": "Evaluate only the first N prompts of each eval dataset (0: all of them, as the reference)."},
    )
    eval_num_sample_images: int = field(
        default=8,
        metadata={"help": "Generated eval images saved as PNG per dataset and evaluation (rank 0's first ones)."},
    )

    def __post_init__(self) -> None:
        for flag in ("eval_timeout", "eval_max_prompts", "eval_num_sample_images"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0; got {getattr(self, flag)}.")
        self.check_switch_flags()


@dataclass
class GRPOConfig(TrainingArguments, AlgorithmFlags):
    """``TrainingArguments`` plus the GRPO flags of the guide (section 5) and DESIGN.md section 4."""

    # --- overrides of TrainingArguments defaults (guide values) ---
    learning_rate: float = field(default=2e-6, metadata={"help": "AdamW learning rate."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in backward to save memory."}
    )

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
    atrain_num_actor_update_steps: int = field(
        default=1,
        metadata={"help": "Split the rollout's samples (one random permutation per rank) into N disjoint parts trained "
                  "one after another over the same drawn timesteps (the remainder is dropped and logged); old "
                  "log-probs are always the rollout's."},
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
        metadata={"help": "A group whose reward std is <= this x its largest |reward| (+ 1e-8) is zero-variance: "
                  "advantage 0 and counted, for grpo and gdpo (float noise otherwise becomes unit-scale advantages)."},
    )
    beta: float = field(default=5e-7, metadata={"help": "KL penalty coefficient."})
    atrain_kl_type: KLType = field(
        default="v-based", metadata={"help": "KL to the reference policy on the velocity or on the step mean."}
    )
    sftaux_coef: float = field(
        default=1e-4, metadata={"help": "lambda of the convex mix (1 - lambda) L_grpo + lambda L_sft; 0 disables SFT-aux."}
    )
    sftaux_batch_size: int = field(default=4, metadata={"help": "SFT-aux samples per GPU per optimizer step."})

    # --- evaluation and logging ---
    eval_freq: int = field(default=10, metadata={"help": "Run UniGenBench evaluation every N optimizer steps (0: never)."})
    sample_image_freq: int = field(default=10, metadata={"help": "Log a grid of rollout images every N steps (0: never)."})
    # --- reward failure budget (issue 11, deepgen_rl/trainer/failure_budget.py) ---
    max_failed_reward_steps: int = field(
        default=3,
        metadata={"help": "Stop (exit 3, after a checkpoint) when a reward failed on all its samples in this many "
                  "consecutive steps and a /health re-check fails (a server answering again gets one more budget; "
                  "0: never)."},
    )
    max_reward_failure_rate: float = field(
        default=0.5,
        metadata={"help": "Stop when a reward failed on more than this fraction of its samples over the last "
                  "--reward_failure_window steps (1: never)."},
    )
    reward_failure_window: int = field(
        default=20, metadata={"help": "Steps over which --max_reward_failure_rate is measured."}
    )
    reward_step_deadline: float = field(
        default=1200.0,
        metadata={"help": "Seconds the reward phase of one step may take; a reward still running then fails its "
                  "samples for that step (0: no limit). Raise it if time/rewards is legitimately longer."},
    )
    # --- end reward failure budget ---
    # --- resume (issue 11, trainer/checkpointing.py) ---
    resume_reset_optimizer: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint saved under another world size (NNODES x NGPUS): load its weights and "
                  "LR schedule and restart AdamW's moments from zero (ZeRO optimizer states are partitioned per "
                  "process). Without it such a resume stops with an error naming both sizes."},
    )
    # --- end resume ---
    # --- EMA of the trained modules (issue 13, trainer/ema.py) ---
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Decay d of an fp32 EMA of the trained parameters, updated after each optimizer step with "
                  "the warm-up min((1 + s) / (10 + s), d) (s = optimizer steps before it); evaluation and sample "
                  "grids then use the EMA weights, and checkpoints save it (ema.pt). 0: off (default)."},
    )
    ema_update_every: int = field(
        default=1,
        metadata={"help": "Update the EMA on every k-th optimizer step (when s, the optimizer steps before it, is a "
                  "multiple of k)."},
    )
    ema_device: Literal["cpu", "same"] = field(
        default="cpu",
        metadata={"help": "Where the EMA lives: 'cpu' (4 bytes per trained parameter of host memory on every rank) "
                  "or 'same' (beside the weights, e.g. on the GPU)."},
    )
    # --- end EMA ---
    # --- step pipeline (issue 12: trainer/streaming.py, trainer/sde_window.py) ---
    stream_rewards: bool = field(
        default=True,
        metadata={"help": "Score each rollout micro-batch (whole groups) as soon as it is decoded, while the next one "
                  "samples; the advantages wait only for what is still in flight (time/reward_wait). Same results "
                  "as false (serial: rollout, decode, then all rewards)."},
    )
    sde_window_size: int = field(
        default=0,
        metadata={"help": "MixGRPO / Flow-GRPO-Fast: SDE on W consecutive steps (ODE elsewhere), only those trained "
                  "(max(1, int(W x --timestep_fraction)) of them; 1.0 trains all) and only their W + 1 latents kept. "
                  "0: off (reference: every step SDE)."},
    )
    sde_window_range: Optional[str] = field(
        default=None,
        metadata={"help": "'a,b': the window start is drawn per step in [a, b - W] (one draw shared by all ranks). "
                  "Default 0,T."},
    )
    eval_before_train: bool = field(
        default=True,
        metadata={"help": "Run the UniGenBench evaluation once at step 0, before training (a fresh run's baseline; "
                  "not repeated on resume). Skipped, with a log line, when evaluation is off or no judge answers."},
    )
    # --- end step pipeline ---

    def __post_init__(self) -> None:
        self._validate_grpo_flags()
        # Type-check the DeepSpeed JSON now, not at the first optimizer step ("gradient_clipping": "1.0").
        if isinstance(self.deepspeed, str) and self.deepspeed:
            ds_config = read_deepspeed_json(self.deepspeed)
            stage = (ds_config.get("zero_optimization") or {}).get("stage")
            if self.ema_decay > 0 and isinstance(stage, (int, float)) and stage >= 3:
                raise ValueError(f"--ema_decay {self.ema_decay} needs whole parameters on every rank, but --deepspeed "
                                 f"{self.deepspeed} is ZeRO-3 (partitioned): use scripts/deepspeed/zero2.json, or "
                                 "--ema_decay 0.")
        if self.sde_eta is None:
            self.sde_eta = DEFAULT_SDE_ETA[self.atrain_sde_sampler]
        # The guide's launcher passes `--report_to wandb,swanlab`; TrainingArguments expects a list.
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        elif isinstance(self.report_to, list):
            self.report_to = [name.strip() for item in self.report_to for name in item.split(",") if name.strip()]
        super().__post_init__()

    def _validate_grpo_flags(self) -> None:
        _check_choice("atrain_sde_sampler", self.atrain_sde_sampler, SDE_SAMPLERS)
        _check_choice("atrain_adv_type", self.atrain_adv_type, ADVANTAGE_TYPES)
        _check_choice("atrain_kl_type", self.atrain_kl_type, KL_TYPES)
        _check_choice("logprob_variant", self.logprob_variant, LOGPROB_VARIANTS)
        _check_choice("optimizer_step_schedule", self.optimizer_step_schedule, OPTIMIZER_STEP_SCHEDULES)
        _check_positive("atrain_num_actor_update_steps", self.atrain_num_actor_update_steps)
        validate_algorithm_flags(self)  # --atrain_algorithm and its flags (algorithm_config.py)
        clip_band(self.clip_range, self.clip_range_low, self.clip_range_high)
        for flag in ("rollout_n", "rollout_micro_batch_size", "atrain_micro_batch_size", "global_batch_size",
                     "num_inference_steps", "image_height", "image_width", "sftaux_batch_size"):
            _check_positive(flag, getattr(self, flag))
        _check_positive("vae_decode_micro_batch_size", self.vae_decode_micro_batch_size)
        if self.rollout_n < 2:
            raise ValueError(f"--rollout_n must be >= 2 (a group needs two samples to compare); got {self.rollout_n}.")
        if self.global_batch_size % self.rollout_n:
            raise ValueError(
                f"--global_batch_size ({self.global_batch_size}) must be a multiple of --rollout_n ({self.rollout_n})."
            )
        for flag in ("image_height", "image_width"):
            if getattr(self, flag) % 16:
                raise ValueError(f"--{flag} must be a multiple of 16 (VAE x8, DiT patch x2); got {getattr(self, flag)}.")
        num_train_steps(self.num_inference_steps, self.timestep_fraction)  # its bounds: T >= 2, fraction in (0, 1]
        _check_range("sftaux_coef", self.sftaux_coef, 0.0, 1.0)
        if self.sde_eta is not None:
            check_sde_eta(self.sde_eta)
        for flag in ("clip_range", "beta", "reward_std_floor", "rollout_cfg_scale", "zero_variance_rtol"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0; got {getattr(self, flag)}.")
        if self.advantage_clip <= 0:
            raise ValueError(f"--advantage_clip must be > 0; got {self.advantage_clip}.")
        for flag in ("eval_freq", "sample_image_freq"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0 (0 disables); got {getattr(self, flag)}.")
        for flag in ("max_failed_reward_steps", "reward_step_deadline"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0; got {getattr(self, flag)}.")
        _check_range("max_reward_failure_rate", self.max_reward_failure_rate, 0.0, 1.0, low_open=True)
        _check_positive("reward_failure_window", self.reward_failure_window)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1) (0 = no EMA); got {self.ema_decay}.")
        _check_positive("ema_update_every", self.ema_update_every)
        _check_choice("ema_device", self.ema_device, ("cpu", "same"))
        if self.sde_window_size:
            sde_window_range(self.num_inference_steps, self.sde_window_size, self.sde_window_range)

    @property
    def num_train_timesteps(self) -> int:
        """How many of the T denoising steps one rollout trains on (``rl.timesteps``; with --sde_window_size, of
        the window's steps)."""
        if self.sde_window_size:
            _, end = sde_window_range(self.num_inference_steps, self.sde_window_size, self.sde_window_range)
            return num_window_train_steps(self.num_inference_steps, self.sde_window_size, self.timestep_fraction, end)
        return num_train_steps(self.num_inference_steps, self.timestep_fraction)


ARGUMENT_GROUPS = (GRPOConfig, ModelArguments, DataArguments, RewardArguments, JudgeArguments, EvalArguments)


def build_parser() -> HfArgumentParser:
    """Our flags first, grouped by dataclass; inherited Trainer flags the loop ignores are hidden (and refused)."""
    return GroupedArgumentParser(ARGUMENT_GROUPS, prog="python -m deepgen_rl.grpo_deepgen",
                                 usage="%(prog)s --output_dir DIR [flags]  (all flags, by group: --help)",
                                 epilog=HELP_EPILOG)


def parse_args(argv: Optional[list[str]] = None
               ) -> tuple[GRPOConfig, ModelArguments, DataArguments, RewardArguments, JudgeArguments, EvalArguments]:
    """Parse command-line flags (``argv`` or ``sys.argv``) into the argument groups of ``ARGUMENT_GROUPS``."""
    parser = build_parser()
    # Inherited Trainer flags our loop does not read stop the run instead of being ignored (trainer_flags.py);
    # checked on the raw parsed values, before TrainingArguments normalises some of them.
    namespace, _ = parser.parse_known_args(args=argv)
    refused = refused_flag_errors(namespace, GRPOConfig)
    if refused:
        raise ValueError("\n".join(refused))
    return tuple(parser.parse_args_into_dataclasses(args=argv))
