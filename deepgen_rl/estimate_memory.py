"""Per-rank GPU memory of a GRPO run, by component, before renting the GPUs.

    python -m deepgen_rl.estimate_memory --num_gpus 8 --deepspeed scripts/deepspeed/zero2.json [training flags]
    python -m deepgen_rl.estimate_memory --compute [...]   # + FLOPs by phase, bytes per rank, s/step on 1-16 nodes

Takes the training flags (same parser as deepgen_rl/grpo_deepgen.py) plus ``--num_gpus`` (ranks in total) and
``--gpu_memory_gib``; builds the model at real size on the ``meta`` device from the config files of the model
paths (or, when they are unset, from the published Qwen2.5-VL-3B / SD3.5-Medium configs), so no weight is read.

How each figure is obtained (B = bytes per weight: 2 in bf16):
* weights by module: parameter counts of the meta model x B (the tied LM head counted once);
* reference copy (KL, --beta > 0, no LoRA): the trained attributes again, x B;
* gradients + optimizer states: DeepSpeed's own ``estimate_zero{2,3}_model_states_mem_needs`` over the
  trainable parameters (ZeRO-2: 18 bytes / parameter / rank = bf16 and fp32 gradients, fp32 master weights,
  Adam m and v; ZeRO-3 partitions the weights too and gathers the largest layer);
* EMA (--ema_decay > 0): 4 bytes x trainable parameters / num_gpus beside the fp32 master partition with
  ``--ema_device gpu`` (on the host instead when the optimizer is offloaded), or 4 bytes x trainable parameters of
  host memory on every rank with ``cpu`` (listed under the host, not in the GPU peak);
* rollout storage: the recorded latents fp32 [T + 1, N, C, h, w], log-probs, prompt embeddings, decoded images;
* activations, MEASURED with torch's MemTracker on the real-size meta model: the VAE decode at the decode
  micro-batch; one DiT block of each kind (dual-attention, plain, last) forward + backward at the train chunk and
  forward under no_grad at the rollout micro-batch. The meta device has no fused attention kernel (it runs the
  math path, materialising [n, heads, S, S]); during the measurement ``scaled_dot_product_attention`` is routed
  to the memory-efficient kernel's own meta implementation, as a GPU runs it. The whole train chunk is then
  composed in closed form: with gradient checkpointing the DiT keeps each other block's inputs
  ((L - 1) x n x S x D x B, S = image + text tokens, D = DiT width) plus the largest block working set (measured),
  plus the chunk's fp32 loss tensors; without it, every block's measured peak is summed (an upper bound); under
  ``--kl_forward shared`` (reference schedule, beta > 0, not ZeRO-3) plus the beta*KL gradient it keeps for the KL
  step, B x trainable parameters (twice with several chunks: a later chunk's gradient while it is added). The
  SFT-aux batch (--sftaux_coef > 0) is composed the same way at the busiest rank's ceil(K / num_gpus) of the
  --sftaux_global_batch_size K items (its captions as long as a prompt; its VAE encode not counted). A
  whole 24-block meta run agrees (7.66 vs 7.59 GiB at the guide's defaults) but takes minutes on a CPU.
  (Measurements: deepgen_rl/model/meta_memory.py.)

Not counted: the prompt encoding's LLM forward (B unique prompts, ~0.1 GiB), the CUDA context and allocator
fragmentation (typically 1-3 GiB), DeepSpeed's communication buckets. The decode micro-batch is read from
``--vae_decode_micro_batch_size`` when that flag exists (else the rollout micro-batch, which decode uses today).

Peak per rank = static (weights, reference, model states, rollout storage) + the largest phase transient.

``--compute`` adds the compute model after the memory estimate (deepgen_rl/perf/, docs/compute.md): FLOPs of one
GRPO step by phase counted with FlopCounterMode on the same meta model, the bytes each rank sends, and the
predicted seconds per step and images/s/GPU on 1, 2, 4, 8 and 16 nodes (a table and a PNG, --compute_plot).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from deepgen_rl.core.sftaux_batch import max_items_per_rank
from deepgen_rl.model.meta_memory import block_peak_bytes, decode_peak_bytes, distinct_blocks

if TYPE_CHECKING:
    from deepgen_rl.config import GRPOConfig, ModelArguments

GIB = 2**30
LOSS_TENSORS = 8  # fp32 [n, C, h, w] tensors of a chunk's step math: x, x_next, v, v_ref, mean, their grads
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class EstimatorArguments:
    """Flags of the estimator beyond the training flags."""

    num_gpus: int = field(default=8, metadata={"help": "Ranks in total (NNODES x NGPUS)."})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "Memory of one GPU in GiB; the estimate is "
                                                                   "compared with it."})
    prompt_tokens: int = field(default=64, metadata={"help": "Tokens of a chat-formatted prompt (template "
                                                               "included) assumed for the text sequence."})

    def __post_init__(self) -> None:
        if self.num_gpus <= 0:
            raise ValueError(f"--num_gpus must be a positive integer; got {self.num_gpus}.")
        if self.gpu_memory_gib <= 0:
            raise ValueError(f"--gpu_memory_gib must be > 0; got {self.gpu_memory_gib}.")
        if self.prompt_tokens <= 0:
            raise ValueError(f"--prompt_tokens must be a positive integer; got {self.prompt_tokens}.")


@dataclass
class MemoryEstimate:
    """components: name -> bytes per rank (static ones and phase transients); total_bytes: peak per rank."""

    components: dict[str, int]
    static: list[str]
    transients: list[str]
    settings: str
    host: dict[str, int] = field(default_factory=dict)  # host memory per rank, not in the GPU peak

    @property
    def peak_phase(self) -> str:
        return max(self.transients, key=lambda name: self.components[name])

    @property
    def total_bytes(self) -> int:
        return sum(self.components[n] for n in self.static) + max(self.components[n] for n in self.transients)

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total_bytes <= gpu_memory_gib * GIB

    def describe(self) -> str:
        lines = [f"per-rank GPU memory ({self.settings})"]
        lines += [f"  {name:<60} {self.components[name] / GIB:8.2f} GiB" for name in self.static]
        lines.append("  phase transients (only the largest counts; phases do not overlap):")
        lines += [f"  {name:<60} {self.components[name] / GIB:8.2f} GiB" + (" <- peak" if name == self.peak_phase
                                                                            else "") for name in self.transients]
        lines.append(f"  {'PEAK per rank':<60} {self.total_bytes / GIB:8.2f} GiB")
        lines += [f"  host, not GPU: {name:<45} {size / GIB:8.2f} GiB" for name, size in self.host.items()]
        return "\n".join(lines)


# ----- closed forms (pure) -----

def num_samples_per_rank(args: GRPOConfig, num_gpus: int) -> int:
    """N = global_batch_size / num_gpus images rolled out per rank (the trainer's batch plan)."""
    from deepgen_rl.trainer.batching import plan_batches

    plan = plan_batches(global_batch_size=args.global_batch_size, rollout_n=args.rollout_n, world_size=num_gpus,
                        atrain_micro_batch_size=args.atrain_micro_batch_size,
                        num_train_timesteps=args.num_train_timesteps, sftaux_enabled=False,
                        optimizer_step_schedule=args.optimizer_step_schedule,
                        actor_update_steps=args.atrain_num_actor_update_steps, kl_step=args.beta > 0)
    return plan.samples_per_rank


def zero_model_states_bytes(trainable: int, largest_layer: int, num_gpus: int, zero_stage: int,
                            offload_optimizer: bool, offload_params: bool) -> int:
    """GPU bytes of gradients + optimizer states (+ ZeRO-3's gathered layer) per rank, from DeepSpeed's estimators,
    minus the 16-bit weights they include (counted with the other weights)."""
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest_layer, num_gpus_per_node=num_gpus, num_nodes=1, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=False, additional_buffer_factor=1.0)
        return gpu  # ZeRO-3's figure holds the partitioned weights: the weights row counts none of them
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=num_gpus, num_nodes=1,
                                                   cpu_offload=offload_optimizer, additional_buffer_factor=1.0)
    return gpu - 2 * trainable


def ema_bytes(trainable: int, num_gpus: int, sharded: bool) -> int:
    """fp32 EMA bytes per rank: 4 x trainable / num_gpus sharded (--ema_device gpu), 4 x trainable whole (cpu)."""
    return -(-4 * trainable // num_gpus) if sharded else 4 * trainable


def rollout_storage_bytes(n: int, steps: int, latent: tuple[int, int, int], text_tokens: int, joint_dim: int,
                          pooled_dim: int, height: int, width: int, weight_bytes: int, window: int = 0) -> int:
    """Latents fp32 [T+1, N, C, h, w] (with an SDE window of W steps: its W + 1 slots and x_T until decoded) +
    log-probs fp32 [T, N] + prompt embeds [N, L, D] and pooled [N, D'] in the weight dtype + images fp32 [N, 3, H, W]."""
    channels, h, w = latent
    latents = ((window + 2) if window else (steps + 1)) * n * channels * h * w * 4
    return (latents + steps * n * 4 + n * (text_tokens * joint_dim + pooled_dim) * weight_bytes
            + n * 3 * height * width * 4)


def dit_train_activation_bytes(block_peaks: list[int], block_input_bytes: int, layers: int, latent_elems: int,
                               n: int, gradient_checkpointing: bool) -> int:
    """Peak activations of one training chunk of n samples through an L-block DiT, forward + backward.

    block_peaks: measured fwd+bwd peak of each block kind; block_input_bytes: one block's inputs n x S x D x B;
    latent_elems: C x h x w (the chunk's fp32 step tensors)."""
    if gradient_checkpointing:
        blocks = (layers - 1) * block_input_bytes + max(block_peaks)
    else:
        blocks = layers * max(block_peaks)
    return blocks + LOSS_TENSORS * n * latent_elems * 4


# ----- the estimate -----

def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def _lora_parameters(transformer, rank: int) -> int:
    from deepgen_rl.trainer.trainable import DIT_LORA_TARGETS

    return sum(rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in DIT_LORA_TARGETS)))


def _largest_layer(model) -> int:
    return max((_count(m.parameters(recurse=False)) for m in model.modules()), default=0)


def weight_components(model, weight_bytes: int, zero_stage: int, num_gpus: int, trained: list[str],
                      edit: bool = False) -> dict[str, int]:
    """16-bit weights by module. Under ZeRO-3 the engine partitions every module: frozen ones hold 1/num_gpus,
    trained ones are inside DeepSpeed's model-states figure. ``edit``: the YAML has an edit dataset."""
    visual = _count(model.lmm.model.visual.parameters())
    # The trainer drops the vision tower before DeepSpeed (model/vision_tower.py) unless an edit dataset needs it.
    parts = {"weights: lmm (Qwen2.5-VL language model)": _count(model.lmm.parameters()) - visual,
             "weights: vision tower (dropped for t2i)": visual if edit else 0,
             "weights: connector + projectors + meta queries": _count(
                 p for name in ("connector", "projector_1", "projector_2", "projector_3")
                 for p in getattr(model, name).parameters()) + model.meta_queries.numel(),
             "weights: transformer (SD3.5 DiT)": _count(model.transformer.parameters()),
             "weights: vae": _count(model.vae.parameters())}
    owner = {"lmm": ("weights: lmm (Qwen2.5-VL language model)",
                     "weights: vision tower (dropped for t2i)"),
             "transformer": ("weights: transformer (SD3.5 DiT)",),
             **{name: ("weights: connector + projectors + meta queries",)
                for name in ("connector", "projector_1", "projector_2", "projector_3", "meta_queries")}}
    trained_rows = {row for name in trained for row in owner.get(name, ())}
    if zero_stage == 3:
        return {name: 0 if name in trained_rows else math.ceil(count * weight_bytes / num_gpus)
                for name, count in parts.items()}
    return {name: count * weight_bytes for name, count in parts.items()}


def estimate_memory(model_args: ModelArguments, args: GRPOConfig, num_gpus: int, zero_stage: int, *, model=None, prompt_tokens: int = 64,
                    offload_optimizer: bool = False, offload_params: bool = False,
                    edit: bool = False) -> MemoryEstimate:
    """Per-rank GPU memory of a GRPO step with the flags ``args`` (GRPOConfig) and ``model_args`` on ``num_gpus``
    ranks under ZeRO ``zero_stage``. ``model``: a real-size meta model (built from ``model_args`` when None).
    ``edit``: the dataset YAML has an edit dataset (the vision tower then stays on the GPU)."""
    from deepgen_rl.model.deepgen import TRAINABLE_MODULES

    model = model if model is not None else build_meta_model(model_args)
    weight_bytes = DTYPE_BYTES[model_args.model_dtype]
    trained = list(TRAINABLE_MODULES[model_args.trainable_modules])
    model.set_trainable(model_args.trainable_modules)
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    model.requires_grad_(False)
    if model_args.use_lora:
        trainable, trained = _lora_parameters(model.transformer, model_args.lora_rank), []
    components = weight_components(model, weight_bytes, zero_stage, num_gpus, trained, edit)
    if args.beta > 0 and not model_args.use_lora:
        components["reference policy copy (frozen trained modules)"] = weight_bytes * _count(
            p for name in trained for p in _parameters_of(getattr(model, name)))
    if args.atrain_algorithm == "diffusionnft":  # its old policy: the trained modules again (the DiT under LoRA)
        copied = ["transformer"] if model_args.use_lora else trained
        components["DiffusionNFT old-policy copy"] = weight_bytes * _count(
            p for name in copied for p in _parameters_of(getattr(model, name)))
    largest = _largest_layer(model) if zero_stage == 3 else 0
    components[f"gradients + optimizer states (ZeRO-{zero_stage}, DeepSpeed estimate)"] = zero_model_states_bytes(
        trainable, largest, num_gpus, zero_stage, offload_optimizer, offload_params)
    host: dict[str, int] = {}
    if args.ema_decay > 0:
        sharded = getattr(args, "ema_device", "cpu") == "gpu"
        ema = ema_bytes(trainable, num_gpus, sharded)
        if sharded and not offload_optimizer:
            components["EMA (fp32, sharded beside the master weights)"] = ema
        else:  # the host copy, or the shards beside an offloaded optimizer's masters
            where = "sharded, offloaded optimizer" if sharded else "whole copy, --ema_device cpu"
            host[f"EMA (fp32, {where})"] = ema

    n = num_samples_per_rank(args, num_gpus)
    latent = tuple(model.latent_shape(args.image_height, args.image_width))
    config = model.transformer.config
    text_tokens = prompt_tokens + model.num_queries
    tokens = (latent[1] // config.patch_size) * (latent[2] // config.patch_size) + text_tokens
    width = config.num_attention_heads * config.attention_head_dim
    latent_elems = latent[0] * latent[1] * latent[2]
    components["rollout storage (latents, log-probs, embeddings, images)"] = rollout_storage_bytes(
        n, args.num_inference_steps, latent, text_tokens, config.joint_attention_dim,
        config.pooled_projection_dim, args.image_height, args.image_width, weight_bytes, args.sde_window_size)
    if args.atrain_algorithm == "grpoguard":  # the rollout keeps each SDE step's mean (mean_old) fp32 [W, N, C, h, w]
        sde_steps = args.sde_window_size or args.num_inference_steps
        components["GRPO-Guard step means"] = sde_steps * n * latent_elems * 4
    static = list(components)

    train_n = min(args.atrain_micro_batch_size, n)
    rollout_n = min(args.rollout_micro_batch_size, n)
    decode_n = min(args.vae_decode_micro_batch_size, n)
    image_tokens = tokens - text_tokens
    blocks = distinct_blocks(model.transformer)
    train_peaks = [block_peak_bytes(b, train_n, image_tokens, text_tokens, True) for b in blocks]
    components[f"train chunk activations, n={train_n}"] = dit_train_activation_bytes(
        train_peaks, train_n * tokens * width * weight_bytes, config.num_layers, latent_elems, train_n,
        args.gradient_checkpointing)
    if (args.beta > 0 and args.optimizer_step_schedule == "reference" and zero_stage < 3
            and getattr(args, "kl_forward", "separate") == "shared"):  # the beta*KL gradient kept for its step,
        copies = 1 if train_n >= n else 2  # and a later chunk's while it is added to the kept one
        components[f"train chunk activations, n={train_n}"] += copies * weight_bytes * trainable
    if args.sftaux_coef > 0:  # the SFT-aux batch: the busiest rank's ceil(K / W) items, one forward + backward
        sft_n = max_items_per_rank(args.sftaux_global_batch_size, num_gpus)
        sft_peaks = train_peaks if sft_n == train_n else [
            block_peak_bytes(b, sft_n, image_tokens, text_tokens, True) for b in blocks]
        components[f"SFT-aux batch activations, n={sft_n}"] = dit_train_activation_bytes(
            sft_peaks, sft_n * tokens * width * weight_bytes, config.num_layers, latent_elems, sft_n,
            args.gradient_checkpointing)
    components[f"rollout forward, n={rollout_n}"] = max(
        block_peak_bytes(b, rollout_n, image_tokens, text_tokens, False) for b in blocks
    ) + LOSS_TENSORS * rollout_n * latent_elems * 4
    components[f"VAE decode, n={decode_n}"] = decode_peak_bytes(model, decode_n, latent)
    settings = (f"ZeRO-{zero_stage}, {num_gpus} GPUs, {n} images/rank, {args.image_height}x{args.image_width}, "
                f"trainable {model_args.trainable_modules}{' (LoRA)' if model_args.use_lora else ''}, "
                f"{trainable / 1e9:.2f} B trainable parameters")
    return MemoryEstimate(components=components, static=static, transients=list(components)[len(static):],
                          settings=settings, host=host)


def _parameters_of(part):
    return [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())


def build_meta_model(model_args):
    """The real-size meta model of ``model_args``' paths, or of the published configs when the paths are unset."""
    from deepgen_rl.model.meta import build_deepgen_model_on_meta

    if model_args.sd3_model_name_or_path and model_args.qwen2_5_vl_model_name_or_path:
        return build_deepgen_model_on_meta(model_args)
    import tempfile

    from deepgen_rl.model.published_configs import write_published_configs

    with tempfile.TemporaryDirectory() as folder:
        sd3, qwen = write_published_configs(folder)
        print("model paths unset: using the published Qwen2.5-VL-3B / SD3.5-Medium configs", file=sys.stderr)
        return build_deepgen_model_on_meta(dataclasses.replace(
            model_args, sd3_model_name_or_path=str(sd3), qwen2_5_vl_model_name_or_path=str(qwen)))


# ----- what would make it fit -----

@dataclass(frozen=True)
class RunShape:
    """The knobs the suggestions turn: training flags, model flags and the DeepSpeed set-up."""

    args: object
    model_args: object
    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: str = ""
    edit: bool = False  # the dataset YAML has an edit dataset (vision tower kept)


def _with_arg(shape: RunShape, **changes) -> RunShape:
    import copy

    args = copy.copy(shape.args)
    for name, value in changes.items():
        object.__setattr__(args, name, value)
    return dataclasses.replace(shape, args=args)


def candidate_changes(shape: RunShape) -> list[tuple[str, RunShape]]:
    """(flags, changed run) pairs, mildest first; --beta 0 and LoRA change the objective and come last."""
    args = shape.args
    changes = []
    if args.vae_decode_micro_batch_size > 4:
        changes.append(("--vae_decode_micro_batch_size 4", _with_arg(shape, vae_decode_micro_batch_size=4)))
    if (getattr(args, "kl_forward", "separate") == "shared" and args.beta > 0
            and args.optimizer_step_schedule == "reference" and shape.zero_stage < 3):
        changes.append(("--kl_forward separate (drops the kept KL gradient; one more DiT forward per chunk)",
                        _with_arg(shape, kl_forward="separate")))
    micro = args.atrain_micro_batch_size
    while micro > 1:
        micro //= 2
        # Below the rollout micro-batch the rollout's DiT forwards shrink to the chunk too (BatchPlan.forward_rows,
        # so the first chunk's ratio stays 1 in bf16): same FLOPs, smaller kernels; the user should know.
        cost = (f" (the rollout's DiT forwards shrink to {micro} rows too: same FLOPs, smaller kernels)"
                if micro < args.rollout_micro_batch_size else "")
        changes.append((f"--atrain_micro_batch_size {micro}{cost}", _with_arg(shape, atrain_micro_batch_size=micro)))
    if args.rollout_micro_batch_size > 8:
        changes.append(("--rollout_micro_batch_size 8", _with_arg(shape, rollout_micro_batch_size=8)))
    if shape.zero_stage < 3:
        changes.append(("--deepspeed scripts/deepspeed/zero3.json", dataclasses.replace(
            shape, zero_stage=3, deepspeed="scripts/deepspeed/zero3.json")))
    changes.append(("--deepspeed scripts/deepspeed/zero3_offload.json", dataclasses.replace(
        shape, zero_stage=3, offload_optimizer=True, offload_params=True,
        deepspeed="scripts/deepspeed/zero3_offload.json")))
    if args.beta > 0:
        changes.append(("--beta 0 (no reference copy; changes the objective)", _with_arg(shape, beta=0.0)))
    if not shape.model_args.use_lora:
        changes.append(("--use_lora True (changes what trains)", dataclasses.replace(
            shape, model_args=dataclasses.replace(shape.model_args, use_lora=True))))
    return changes


def flags_that_fit(shape: RunShape, model, num_gpus: int, gpu_memory_gib: float,
                   prompt_tokens: int) -> list[tuple[str, float]]:
    """Single changes that bring the peak under ``gpu_memory_gib``, with their peak in GiB."""
    fitting = []
    for flags, changed in candidate_changes(shape):
        if any(flags.split()[0] == done.split()[0] for done, _ in fitting):
            continue  # the mildest value of a flag that fits is enough (e.g. the largest micro-batch)
        estimate = _estimate(changed, model, num_gpus, prompt_tokens)
        if estimate.fits(gpu_memory_gib):
            fitting.append((flags, estimate.total_bytes / GIB))
    return fitting


def _estimate(shape: RunShape, model, num_gpus: int, prompt_tokens: int) -> MemoryEstimate:
    return estimate_memory(shape.model_args, shape.args, num_gpus, shape.zero_stage, model=model,
                           prompt_tokens=prompt_tokens, offload_optimizer=shape.offload_optimizer,
                           offload_params=shape.offload_params, edit=shape.edit)


# ----- command line -----

def run_shape_from_args(args: GRPOConfig, model_args: ModelArguments, dataset_config: str = "") -> RunShape:
    from deepgen_rl.trainer.deepspeed_setup import load_deepspeed_config, offloads, zero_stage

    config = load_deepspeed_config(args.deepspeed)
    return RunShape(args=args, model_args=model_args, zero_stage=zero_stage(config),
                    offload_optimizer=offloads(config, "optimizer"), offload_params=offloads(config, "param"),
                    deepspeed=str(args.deepspeed or "built-in ZeRO-2"), edit=_has_edit_dataset(dataset_config))


def _has_edit_dataset(dataset_config: str) -> bool:
    """Whether the --dataset_config YAML names an edit JSONL (False when none is given or it does not exist)."""
    from deepgen_rl.data import load_dataset_config

    if not dataset_config or not Path(dataset_config).is_file():
        return False
    return any(entry.is_edit for entry in load_dataset_config(dataset_config).datasets)


def main(argv: Optional[list[str]] = None) -> int:
    from deepgen_rl.config import DataArguments, GRPOConfig, ModelArguments, removed_flag_errors
    from deepgen_rl.config.trainer_flags import GroupedArgumentParser

    # The estimator's own flags first, then the training flags grouped as the trainer's --help shows them.
    from deepgen_rl.estimate.compute import ComputeArguments

    parser = GroupedArgumentParser((EstimatorArguments, ComputeArguments, GRPOConfig, ModelArguments, DataArguments),
                                   prog="python -m deepgen_rl.estimate_memory",
                                   usage="%(prog)s --num_gpus N --deepspeed JSON [training flags]  (all: --help)",
                                   description=__doc__.split("\n\n")[0])
    removed = removed_flag_errors(list(sys.argv[1:] if argv is None else argv))
    if removed:
        parser.error("\n".join(removed))
    try:
        estimator, compute_args, args, model_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, FileNotFoundError) as err:  # a bad value or path: its message, not a traceback
        parser.error(str(err))
    shape = run_shape_from_args(args, model_args, data_args.dataset_config)
    model = build_meta_model(model_args)
    try:
        estimate = _estimate(shape, model, estimator.num_gpus, estimator.prompt_tokens)
    except ValueError as err:  # e.g. a batch that does not split over --num_gpus: the fix, not a traceback
        parser.error(str(err))
    print(estimate.describe())
    budget = estimator.gpu_memory_gib
    if estimate.fits(budget):
        print(f"FITS in {budget:g} GiB per GPU ({budget - estimate.total_bytes / GIB:.1f} GiB to spare).")
    else:
        print(f"DOES NOT FIT in {budget:g} GiB per GPU (peak phase: {estimate.peak_phase}).")
        fitting = flags_that_fit(shape, model, estimator.num_gpus, budget, estimator.prompt_tokens)
        if fitting:
            print("Any one of these would make it fit:")
            print("\n".join(f"  {flags}  -> {peak:.2f} GiB" for flags, peak in fitting))
        else:
            print("No single flag change fits; combine them, or use more GPUs (--num_gpus).")
    if compute_args.compute:
        _print_compute(model, shape, estimator, compute_args)
    return 0 if estimate.fits(budget) else 1


def _print_compute(model, shape: RunShape, estimator: EstimatorArguments, compute_args) -> None:
    """The compute half (--compute): deepgen_rl/estimate/compute.py."""
    from deepgen_rl.estimate.compute import compute_report, write_plot

    report = compute_report(model, shape.args, shape.model_args, num_gpus=estimator.num_gpus,
                            zero_stage=shape.zero_stage, prompt_tokens=estimator.prompt_tokens,
                            compute_args=compute_args, weight_bytes=DTYPE_BYTES[shape.model_args.model_dtype],
                            edit=shape.edit)
    print(report.describe())
    plot = write_plot(report, compute_args.compute_plot)
    if plot:
        print(f"plot: {plot}")


if __name__ == "__main__":
    sys.exit(main())
