"""The compute half of ``python -m deepgen_rl.estimate_memory --compute``: FLOPs by phase, bytes per rank and the
predicted s/step and images/s/GPU on 1..16 nodes, for the training flags given (docs/compute.md)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

from deepgen_rl.perf.comm import ParamBytes, bytes_per_rank, comm_counts
from deepgen_rl.perf.flop_units import FlopUnits, measure_units
from deepgen_rl.perf.step_flops import PHASES, flops_by_timer, kl_forward_mode, phase_flops, step_counts
from deepgen_rl.perf.table import NODES, Hardware, ScalingRow, format_table, plot_rows, scaling_rows

H100_BF16_DENSE_TFLOPS = 989.4
SCHEDULES = ("reference", "per_timestep", "per_rollout")
PHASE_LABELS = {
    "prompt_encoding": "prompt encoding (LLM + connector, CFG negative incl.)",
    "rollout": "rollout (T no-grad DiT forwards per image)",
    "vae_decode": "VAE decode",
    "policy_forward": "policy chunks: forward",
    "policy_recompute": "policy chunks: recompute (gradient checkpointing)",
    "policy_backward": "policy chunks: backward",
    "reference_forward": "reference forward (KL)",
    "nft_old_forward": "old-policy forward (DiffusionNFT)",
    "kl_step": "KL step (reference schedule, beta > 0)",
    "sftaux": "SFT-aux (VAE encode, caption, DiT fwd + bwd)",
    "ema": "EMA (elementwise)",
    "nft_old_update": "NFT old-policy update (elementwise)",
}


@dataclass
class ComputeArguments:
    """Flags of the compute half (``--compute``), beside the memory estimator's."""

    compute: bool = field(default=False, metadata={
        "help": "Also print the compute model after the memory estimate: FLOPs of one GRPO step by phase (counted "
                "with FlopCounterMode on the real-size meta model), bytes each rank sends, and predicted s/step and "
                "images/s/GPU on 1, 2, 4, 8, 16 nodes (docs/compute.md)."})
    assumed_mfu: float = field(default=0.4, metadata={
        "help": "Share of --gpu_peak_tflops the step's FLOPs are assumed to run at (--compute)."})
    intra_node_gbps: float = field(default=400.0, metadata={
        "help": "GB/s (gigaBYTES) one GPU sends at inside a node (--compute; NVLink 4 ~ 400 effective)."})
    inter_node_gbps: float = field(default=50.0, metadata={
        "help": "GB/s (gigaBYTES) one GPU sends at across nodes (--compute; one 400 Gb/s NIC per GPU = 50)."})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node of the scaling table (--compute)."})
    compute_plot: str = field(default="compute_scaling.png", metadata={
        "help": "PNG of the scaling table (--compute; '' for none)."})

    def __post_init__(self) -> None:
        if not 0 < self.assumed_mfu <= 1:
            raise ValueError(f"--assumed_mfu must be in (0, 1]; got {self.assumed_mfu}.")
        for flag in ("intra_node_gbps", "inter_node_gbps", "gpus_per_node"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"--{flag} must be > 0; got {getattr(self, flag)}.")


@dataclass
class ComputeReport:
    units: FlopUnits
    flops: dict[str, int]  # the run's schedule, by phase (per rank per GRPO step)
    comm: dict[str, float]  # bytes per rank per step at the flags' world size
    rows: dict[str, list[ScalingRow]]  # schedule -> table rows
    hardware: Hardware
    images_per_rank: int
    world_size: int
    # (the other --kl_forward value, the step's total with it): reference schedule, beta > 0, ZeRO-1/2 only
    other_kl: Optional[tuple[str, int]] = None

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def describe(self) -> str:
        total, unit = self.total_flops, self.units.dit_forward
        lines = [f"FLOPs of one GRPO step per rank ({self.images_per_rank} images; F = one DiT forward of one image "
                 f"= {unit / 1e12:.3f} TFLOP at {self.units.text_tokens} text tokens; FlopCounterMode on the meta "
                 "model)"]
        for phase in PHASES:
            value = self.flops[phase]
            if value:
                lines.append(f"  {PHASE_LABELS[phase]:<55} {value / 1e15:9.3f} PFLOP {value / unit:9.0f} F "
                             f"{value / total:6.1%}")
        lines.append(f"  {'TOTAL':<55} {total / 1e15:9.3f} PFLOP {total / unit:9.0f} F")
        if self.other_kl is not None:
            mode, flops = self.other_kl
            lines.append(f"  with --kl_forward {mode}: {flops / 1e15:.3f} PFLOP ({flops / total - 1:+.1%})")
        lines.append(f"bytes each rank sends per GRPO step (world size {self.world_size}):")
        lines += [f"  {name:<55} {value / 1e9:9.2f} GB" for name, value in self.comm.items()]
        lines.append(format_table(self.rows, self.hardware))
        return "\n".join(lines)


def _with(args, **changes):
    changed = copy.copy(args)
    for name, value in changes.items():
        object.__setattr__(changed, name, value)
    return changed


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def param_bytes(model, units: FlopUnits, weight_bytes: int, edit: bool = False) -> ParamBytes:
    """Weights that travel: the trained ones, and each partitioned module (ZeRO-3 gathers); the vision tower only
    for an edit run (text-to-image drops it)."""
    visual = 0 if edit else _count(model.lmm.model.visual.parameters())
    text = (_count(model.lmm.parameters()) - visual + model.meta_queries.numel()
            + _count(p for name in ("connector", "projector_1", "projector_2", "projector_3")
                     for p in getattr(model, name).parameters()))
    return ParamBytes(trained=units.trained_params * weight_bytes,
                      dit=_count(model.transformer.parameters()) * weight_bytes, text=text * weight_bytes,
                      vae=_count(model.vae.parameters()) * weight_bytes)


def compute_report(model, args, model_args, *, num_gpus: int, zero_stage: int, prompt_tokens: int,
                   compute_args: ComputeArguments, weight_bytes: int = 2, edit: bool = False) -> ComputeReport:
    """The compute model of the flags ``args`` / ``model_args`` on the real-size meta ``model``."""
    from deepgen_rl.perf.peak import default_peak_tflops
    from deepgen_rl.trainer.batching import plan_batches

    if model_args.use_lora:
        from deepgen_rl.perf.flop_units import meta_copy
        from deepgen_rl.trainer.trainable import LoraSettings, add_dit_lora

        model = meta_copy(model)  # the adapters go on a copy: the caller's model stays as it was
        model.set_trainable(model_args.trainable_modules)
        add_dit_lora(model, LoraSettings(rank=model_args.lora_rank, alpha=model_args.lora_alpha))
    else:
        model.set_trainable(model_args.trainable_modules)
    text_trains = model_args.trainable_modules != "dit" and not model_args.use_lora
    try:
        units = measure_units(model, height=args.image_height, width=args.image_width, prompt_tokens=prompt_tokens,
                              gradient_checkpointing=args.gradient_checkpointing)
        params = param_bytes(model, units, weight_bytes, edit)
    finally:
        model.requires_grad_(False)
    peak = default_peak_tflops(getattr(args, "gpu_peak_tflops", None)) or H100_BF16_DENSE_TFLOPS
    hw = Hardware(peak_tflops=peak, mfu=compute_args.assumed_mfu, intra_node_gbps=compute_args.intra_node_gbps,
                  inter_node_gbps=compute_args.inter_node_gbps, gpus_per_node=compute_args.gpus_per_node)
    sftaux = args.sftaux_coef > 0

    def model_of(run_args, world_size: int):
        plan = plan_batches(global_batch_size=run_args.global_batch_size // num_gpus * world_size,
                            rollout_n=run_args.rollout_n, world_size=world_size,
                            atrain_micro_batch_size=run_args.atrain_micro_batch_size,
                            num_train_timesteps=run_args.num_train_timesteps, sftaux_enabled=sftaux,
                            optimizer_step_schedule=run_args.optimizer_step_schedule,
                            actor_update_steps=run_args.atrain_num_actor_update_steps, kl_step=run_args.beta > 0)
        counts = step_counts(run_args, plan, text_trains=text_trains, sftaux=sftaux, zero_stage=zero_stage)
        comm = comm_counts(counts, plan, rollout_micro_batch_size=run_args.rollout_micro_batch_size,
                           decode_micro_batch_size=run_args.vae_decode_micro_batch_size,
                           forward_rows=plan.forward_rows(run_args.rollout_micro_batch_size))
        return plan, phase_flops(units, counts), bytes_per_rank(comm, params, world_size, zero_stage)

    plan, flops, comm = model_of(args, num_gpus)
    # Each schedule with its own FLOPs; under --beta > 0 the reference schedule with both KL variants.
    variants = {}
    for schedule in SCHEDULES:
        variants[schedule] = _with(args, optimizer_step_schedule=schedule)
        if schedule == "reference" and args.beta > 0:
            variants[schedule] = _with(variants[schedule], kl_forward="separate")
            variants["reference, shared KL"] = _with(variants[schedule], kl_forward="shared")
    other_kl, mode = None, kl_forward_mode(args, zero_stage)
    if mode != "none" and zero_stage < 3:
        other = "separate" if mode == "shared" else "shared"
        other_kl = (other, sum(model_of(_with(args, kl_forward=other), num_gpus)[1].values()))
    rows = {}
    for name, run_args in variants.items():
        run_flops = sum(model_of(run_args, num_gpus)[1].values())
        rows[name] = scaling_rows(run_flops, lambda world, a=run_args: sum(model_of(a, world)[2].values()),
                                  plan.samples_per_rank, hw, NODES)
    return ComputeReport(units=units, flops=flops, comm=comm, rows=rows, hardware=hw,
                         images_per_rank=plan.samples_per_rank, world_size=num_gpus,
                         other_kl=other_kl)


def write_plot(report: ComputeReport, path: str) -> Optional[str]:
    return str(plot_rows(report.rows, report.hardware, path)) if path else None


__all__ = ["ComputeArguments", "ComputeReport", "compute_report", "flops_by_timer", "write_plot"]
