"""DeepGenGRPOTrainer: rollout -> decode -> rewards -> advantages -> optimizer step(s), under DeepSpeed.

One GRPO step on every rank (DESIGN.md section 3; legend: B prompts per rank, G = rollout_n, N = B*G):

    rollout     B prompts from the seeded sampler, G SDE samples each (recorded latents, log-probs, embeddings;
                with --sde_window_size only the window is SDE and recorded: sde_window.py)
    decode      VAE -> N images
    rewards     the prompt's datasets' reward functions, concurrently (failed samples are masked, not zeroed);
                with --stream_rewards decode and scoring start per rollout micro-batch (streaming.py)
    advantages  GRPO / GDPO, normalised over ALL ranks (a collective)
    train       per actor update (--atrain_num_actor_update_steps parts of the N samples): int(T x
                timestep_fraction) drawn steps x ceil(S / atrain_micro_batch_size) chunks, each a backward of its
                share of the loss; + the SFT-aux batch; optimizer steps as --optimizer_step_schedule says
                (batching.py), all taken in ``optimizer_step`` (the first chunk's ratio is exactly 1)
    eval / log  UniGenBench every --eval_freq steps (hook); metrics, sample grids, checkpoints

Departures from the DeepGen-RL reference: failed rewards are excluded instead of scored 0 / 0.5; a non-finite
loss skips the optimizer step instead of corrupting the weights; GDPO normalises over all ranks; gradient
accumulation is derived, so any NNODES x NGPUS works; resume needs no DeepSpeed patch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from deepgen_rl.data import PromptSample
from deepgen_rl.model.vision_tower import drop_vision_tower
from deepgen_rl.trainer.edit_rollout import (group_sources, has_edit_datasets, row_sources, row_targets,
                                             step_edit_conditioning)
from deepgen_rl.rewards.reward_step import RewardBatch
from deepgen_rl.rl import AdvantageResult, compute_advantages
from deepgen_rl.sampling import Conditioning, Trajectory, encode_conditioning, rollout

from . import checkpointing
from .batching import BatchPlan, plan_batches, total_training_steps
from .deepspeed_setup import initialize_engine
from ..distributed import (SEED_ACTOR_UPDATES, SEED_ROLLOUT, SEED_SFTAUX, all_gather_cat,
                           all_reduce_sum, derive_seed, rank_and_world, seeded_generator)
from .ema import EMA, ema_sample_images
from .eval_hook import EvalHook
from .failure_budget import FailureBudget, RewardFailureBudgetExceeded, RunSummary, budget_verdict, step_counts
from .logging_utils import MetricsLogger, TrackerSettings
from .nft import NFT_STATE_NAME, NftOldPolicy
from .objective import ObjectiveSettings, policy_chunk_objective, sftaux_objective
from .reference_policy import ReferencePolicy
from .sde_window import draw_sde_window, draw_train_steps
from .signals import GracefulStop, StepInterrupted
from .step_metrics import PhaseTimer, advantage_metrics, reward_metrics, weighted_reward
from .streaming import RewardStream, decode_chunks, log_chunking, reward_chunks
from .trainable import LoraSettings, configure_trainable
from .update_plan import ChunkStats, OptimizerStepRecord, actor_update_parts, part_chunks

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """This rank's rollout: B prompt samples (each with dataset + reward weights) and the N-row trajectory."""

    samples: list[PromptSample]
    trajectory: Trajectory
    images: Optional[torch.Tensor] = None  # [N, 3, H, W] in [0, 1]
    truncated_prompts: int = 0  # of the B prompts, cut to --max_prompt_length (their user text only)
    sde_window: Optional[tuple[int, int]] = None  # (start, end) of the SDE window; None: every step SDE
    rewards_in_flight: Optional[RewardStream] = None  # --stream_rewards: the chunks scored during the rollout

    @property
    def unique_prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]


@dataclass
class _UpdateContext:
    """What every chunk of one GRPO step's update shares (advantages [N] and valid [N] on the device)."""

    batch: RolloutBatch
    adv: torch.Tensor
    valid: torch.Tensor
    reference_conditioning: Optional[Conditioning]
    first_deviation: float = float("nan")  # max |ratio - 1| of the step's first chunk (exactly 0 up to fp32 noise)
    max_deviation: float = 0.0
    rollout_chunks: list = field(default_factory=list)  # per_rollout: the chunks seen before its one step
    nft_draw: Optional[object] = None  # --atrain_algorithm diffusionnft: the step's per-sample timesteps (nft.py)


class DeepGenGRPOTrainer:
    """GRPO for the DeepGen model. ``train()`` runs to --max_steps (or the epochs' worth of prompts)."""

    def __init__(self, model: torch.nn.Module, args, *, prompt_sampler, reward_step, num_prompts: int,
                 trainable_modules: str = "dit", lora: Optional[LoraSettings] = None, sftaux_sampler=None,
                 eval_hook: Optional[EvalHook] = None, tracker: Optional[TrackerSettings] = None) -> None:
        self.args = args
        self.rank, self.world_size = rank_and_world()
        self.prompt_sampler, self.reward_step = prompt_sampler, reward_step
        self.sftaux_sampler = sftaux_sampler if args.sftaux_coef > 0 else None
        self.eval_hook = eval_hook
        self.tracker = tracker or TrackerSettings(report_to=(), run_name=args.run_name or "deepgen-grpo")
        self.trained_modules = configure_trainable(model, trainable_modules, lora)
        if not has_edit_datasets(prompt_sampler):  # edit prompts read their sources with it
            drop_vision_tower(model)  # text-to-image only: keeps ~1.25 GiB off each GPU (model/vision_tower.py)
        self.text_trains = any(name != "transformer" for name in self.trained_modules)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # The reference must be copied BEFORE deepspeed.initialize (ZeRO-3 partitions the live weights).
        self.reference: Optional[ReferencePolicy] = None
        if args.beta > 0:
            self.reference = (ReferencePolicy.adapters_disabled(model) if lora is not None
                              else ReferencePolicy.frozen_copy(model, self.trained_modules))
        self.nft = NftOldPolicy.from_args(model, args, self.trained_modules)  # diffusionnft's old policy, else None
        self.plan: BatchPlan = plan_batches(
            global_batch_size=args.global_batch_size, rollout_n=args.rollout_n, world_size=self.world_size,
            atrain_micro_batch_size=args.atrain_micro_batch_size, num_train_timesteps=args.num_train_timesteps,
            sftaux_enabled=self.sftaux_sampler is not None, optimizer_step_schedule=args.optimizer_step_schedule,
            actor_update_steps=args.atrain_num_actor_update_steps, kl_step=self.reference is not None)
        self.max_steps = total_training_steps(max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
                                              num_prompts=num_prompts, prompts_per_step=self.plan.prompts_per_step)
        # The LR schedule and its warm-up count optimizer steps (several per rollout unless per_rollout).
        parts = initialize_engine(model, args, self.plan, self.max_steps * self.plan.optimizer_steps_per_rollout)
        self.engine, self.ds_config = parts.engine, parts.config
        self.model = self.engine.module
        self.device = torch.device(self.engine.device)
        if self.reference is not None:
            self.reference.to(self.device, dtype=next(self.model.transformer.parameters()).dtype)
        if self.nft is not None:
            self.nft.to(self.device, dtype=next(self.model.transformer.parameters()).dtype)
        self.ema: Optional[EMA] = EMA.from_args(self.model, args)  # --ema_decay (None when 0)
        self.objective = ObjectiveSettings.from_args(args)
        self.state = checkpointing.TrainerState(max_steps=self.max_steps, world_size=self.world_size,
                                                global_batch_size=args.global_batch_size)
        self.timer = PhaseTimer()
        self.failure_budget = FailureBudget(args.max_failed_reward_steps, args.max_reward_failure_rate,
                                            args.reward_failure_window)
        self.summary = RunSummary()
        self._stop: Optional[GracefulStop] = None  # set while train() runs: its safe points may stop a step
        self._last_saved_step: Optional[int] = None
        self.optimizer_steps_taken = self.optimizer_steps_applied = 0  # in the current GRPO step
        self.step_records: list[OptimizerStepRecord] = []  # the current GRPO step's optimizer steps
        self._stats = ChunkStats()
        self._last_grad_norm = None
        self._step_lr = float("nan")
        if self.rank == 0:
            logger.info("batch plan: %s; %d GRPO steps x %d optimizer steps", self.plan, self.max_steps,
                        self.plan.optimizer_steps_per_rollout)
            log_chunking(args.rollout_micro_batch_size, args.rollout_n, args.stream_rewards)

    # ----- phases ---------------------------------------------------------------------------------------------

    def rollout_phase(self, step: int) -> RolloutBatch:
        """Draw this rank's B prompts and sample G trajectories each (no gradients); with --stream_rewards each
        finished micro-batch is decoded and its scoring started at once (trainer/streaming.py)."""
        args = self.args
        samples = self.prompt_sampler.sample(self.plan.prompts_per_rank)
        generator = seeded_generator(self.device, derive_seed(args.seed, SEED_ROLLOUT, step, self.rank))
        window = draw_sde_window(args, step)  # the same on every rank (seeded by the step)
        edit = step_edit_conditioning(self.model, samples, args.rollout_n, args.image_height, args.image_width)
        stream = (RewardStream(self.model, self.reward_step, samples, args.rollout_n, args.rollout_micro_batch_size,
                               args.vae_decode_micro_batch_size, edit) if args.stream_rewards else None)
        self.model.eval()
        # DiffusionNFT: the old policy rolls out with the deterministic ODE (trainer/nft.py).
        trajectory = rollout(
            self.model if self.nft is None else self.nft.rollout_model, [s.prompt for s in samples],
            group_size=args.rollout_n, sampler=args.atrain_sde_sampler if self.nft is None else "ode",
            eta=args.sde_eta, logprob_variant=args.logprob_variant, num_inference_steps=args.num_inference_steps,
            height=args.image_height, width=args.image_width, cfg_scale=args.rollout_cfg_scale,
            init_same_noise=args.init_same_noise, generator=generator,
            micro_batch_size=args.rollout_micro_batch_size, sde_window=window,
            on_micro_batch=None if stream is None else stream.on_micro_batch,
            record_means=args.atrain_algorithm == "grpoguard", edit=edit)
        truncated = sum(self.model.format_prompts([s.prompt for s in samples]).truncated)
        batch = RolloutBatch(samples=samples, trajectory=trajectory, truncated_prompts=truncated, sde_window=window,
                             rewards_in_flight=stream)
        if stream is not None:
            batch.images = stream.images
            trajectory.release_final()
        return batch

    def decode_phase(self, batch: RolloutBatch) -> None:
        """Serial path: x_T decoded in the streamed path's group-aligned chunks (identical images)."""
        trajectory, args = batch.trajectory, self.args
        chunks = reward_chunks(trajectory.num_samples, args.rollout_micro_batch_size, args.rollout_n)
        batch.images = decode_chunks(self.model, trajectory.final_latents, chunks, args.vae_decode_micro_batch_size)
        trajectory.release_final()  # windowed: x_T lived outside the W + 1 training slots

    def reward_phase(self, batch: RolloutBatch) -> RewardBatch:
        """This rank's N samples scored by their datasets' rewards (scores [N, K], weights, failed mask); when
        streamed, only the wait for the chunks still in flight."""
        if batch.rewards_in_flight is not None:
            return batch.rewards_in_flight.result()
        trajectory = batch.trajectory
        weights = trajectory.per_sample([s.reward_weights for s in batch.samples])
        return self.reward_step.score(batch.images, trajectory.prompts, weights, trajectory.group_ids,
                                      sources=row_sources(trajectory.edit),
                                      targets=row_targets(batch.samples, trajectory.group_size))

    def advantage_phase(self, rewards: RewardBatch) -> tuple[Optional[AdvantageResult], dict[str, float]]:
        """Advantages over all ranks (collective), or None when no sample of any rank has a reward."""
        valid = ~rewards.failed
        names = list(rewards.names)
        failed_all = all_gather_cat(rewards.failed, self.device)  # [N_all] bool, the same on every rank
        metrics = reward_metrics(names, all_gather_cat(rewards.scores, self.device),
                                 all_gather_cat(rewards.weights, self.device), failed_all)
        if bool(failed_all.all()):
            logger.warning("every reward of step %d failed on every rank: the step is skipped.", self.state.global_step)
            return None, metrics
        result = compute_advantages(self.args.atrain_adv_type, rewards.scores, rewards.weights, self.args.rollout_n,
                                    valid=valid, std_floor=self.args.reward_std_floor, clip=self.args.advantage_clip,
                                    zero_variance_rtol=self.args.zero_variance_rtol)
        counts = all_reduce_sum(torch.tensor([result.zero_variance_group_fraction * result.num_groups,
                                              result.num_groups, result.clip_fraction * result.num_valid,
                                              result.num_valid], dtype=torch.float64), self.device)
        metrics["adv/zero_variance_group_fraction"] = float(counts[0] / counts[1].clamp_min(1))
        metrics["adv/clip_fraction"] = float(counts[2] / counts[3].clamp_min(1))
        metrics.update(advantage_metrics(all_gather_cat(result.advantages, self.device),
                                         all_gather_cat(result.valid, self.device)))
        return result, metrics

    def train_phase(self, batch: RolloutBatch, advantages: Optional[AdvantageResult], step: int) -> dict[str, float]:
        """Every actor update's drawn timesteps in chunks (+ SFT-aux), stepped as --optimizer_step_schedule says."""
        if advantages is None:
            return {"train/skipped": 1.0, "train/step_applied": 0.0, "train/optimizer_steps": 0.0}
        args, plan, trajectory = self.args, self.plan, batch.trajectory
        # One draw shared by every rank (seeded by the step only; inside the SDE window when on); the actor-update
        # split is per rank.
        steps = draw_train_steps(args, batch.sde_window, step)
        parts_generator = seeded_generator(torch.device("cpu"), derive_seed(args.seed, SEED_ACTOR_UPDATES, step,
                                                                            self.rank))
        parts = actor_update_parts(trajectory.num_samples, plan.actor_update_steps, parts_generator)
        assert len(steps) == plan.num_train_timesteps, "batch plan and drawn steps disagree"
        adv, valid = advantages.advantages.to(self.device), advantages.valid.to(self.device)
        ctx = _UpdateContext(batch=batch, adv=adv, valid=valid, reference_conditioning=None)
        if self.nft is not None:  # DiffusionNFT: "timestep" i is column i of per-sample random sigmas (nft.py)
            ctx.nft_draw = self.nft.draw(trajectory, len(steps), seed=args.seed, step=step, rank=self.rank)
            steps = list(range(len(steps)))
        if self.reference is not None and self.text_trains:
            ctx.reference_conditioning = self.reference.conditioning(batch.unique_prompts, args.rollout_n,
                                                                     args.rollout_cfg_scale, trajectory.edit)
        self.step_records, self._stats = [], ChunkStats()
        lr = float(self.engine.get_lr()[0])
        valid_cpu = advantages.valid.cpu()
        per_rollout = plan.optimizer_step_schedule == "per_rollout"
        # per_rollout: the masked mean over (drawn steps x valid samples of every part); else per (part, timestep).
        rollout_denominator = sum(max(int(valid_cpu[p].sum()), 1) for p in parts) * len(steps)
        self.model.train()
        for k, part in enumerate(parts):
            chunks = part_chunks(part, trajectory.num_samples, plan.train_micro_batch_size)
            denominator = rollout_denominator if per_rollout else max(int(valid_cpu[part].sum()), 1)
            for i, step_index in enumerate(steps):
                rollout_ends = per_rollout and self.sftaux_sampler is None and (k, i) == (len(parts) - 1,
                                                                                          len(steps) - 1)
                self._train_timestep(ctx, step_index, chunks, denominator, last_backward=rollout_ends)
        metrics = {"train/lr": lr, "policy/first_chunk_ratio_max_dev": ctx.first_deviation,
                   "policy/ratio_max_dev": ctx.max_deviation,
                   "train/actor_dropped_samples": float(trajectory.num_samples
                                                        - plan.actor_update_steps * plan.samples_per_update)}
        if self.sftaux_sampler is not None:
            metrics["loss/sft"] = self._sftaux_micro_step(step)
            self._stats.nonfinite_losses += 0.0 if math.isfinite(metrics["loss/sft"]) else 1.0
        metrics.update(self._finish_step(self._stats))
        if self.nft is not None:  # old <- d old + (1 - d) theta, after the step's optimizer steps
            self.nft.update(self.model, int(metrics["train/optimizer_steps"]))
            metrics.update(self.nft.metrics(self.device))
        return metrics

    def _train_timestep(self, ctx: "_UpdateContext", step_index: int, chunks, denominator: int, *,
                        last_backward: bool) -> None:
        """One drawn timestep of one actor update: its chunks' backward passes and, unless per_rollout, its
        optimizer step(s). ``last_backward``: per_rollout's final backward (the rollout's one boundary)."""
        schedule = self.plan.optimizer_step_schedule
        split_kl = schedule == "reference" and self.plan.kl_step
        policy_share = 1.0 - self.args.sftaux_coef if self.sftaux_sampler is not None else 1.0
        seen = []
        for j, rows in enumerate(chunks):
            if not self.optimizer_steps_taken:  # nothing of this GRPO step applied yet: a stop here loses nothing
                self._safe_point("training chunk")
            out = self._chunk_objective(ctx, step_index, rows)
            seen.append(out)
            # Each chunk's share of the masked mean over the step's valid samples; the convex SFT-aux mix
            # L = (1 - lambda) L_grpo + lambda L_sft is applied as per-backward weights.
            term = out.policy_term if split_kl else out.loss
            boundary = j == len(chunks) - 1 and (last_backward or schedule != "per_rollout")
            self._backward(term * (policy_share * out.num_valid / denominator), boundary=boundary)
            self._stats.add(out, math.isfinite(float(term.detach())))
        if schedule == "per_rollout":
            if last_backward:
                self._record_step("rollout", ctx.rollout_chunks + seen)
            else:
                ctx.rollout_chunks.extend(seen)
            return
        self._record_step("policy" if split_kl else "policy+kl", seen)
        if split_kl:  # the reference's separate beta*KL backward, on a fresh forward under the updated weights
            kl_seen = []
            for j, rows in enumerate(chunks):
                out = self._chunk_objective(ctx, step_index, rows)
                kl_seen.append(out)
                self._backward(out.kl_term * (policy_share * out.num_valid / denominator),
                               boundary=j == len(chunks) - 1)
                self._stats.nonfinite_losses += 0.0 if math.isfinite(float(out.kl_term.detach())) else 1.0
            self._record_step("kl", kl_seen)

    def _chunk_objective(self, ctx: "_UpdateContext", step_index: int, rows):
        args = self.args
        conditioning = (encode_conditioning(self.model, ctx.batch.unique_prompts, args.rollout_n,
                                            args.rollout_cfg_scale, ctx.batch.trajectory.edit)
                        if self.text_trains else None)
        if self.nft is not None:
            out = self.nft.chunk_objective(self.model, ctx.batch.trajectory, ctx.nft_draw, step_index, rows,
                                           advantages=ctx.adv, valid=ctx.valid, beta=args.beta,
                                           reference=self.reference, reference_conditioning=ctx.reference_conditioning,
                                           conditioning=conditioning)
        else:
            out = policy_chunk_objective(self.model, ctx.batch.trajectory, step_index, rows, advantages=ctx.adv,
                                         valid=ctx.valid, settings=self.objective, reference=self.reference,
                                         reference_conditioning=ctx.reference_conditioning, conditioning=conditioning)
        if math.isnan(ctx.first_deviation):
            ctx.first_deviation = out.ratio_max_dev
        ctx.max_deviation = max(ctx.max_deviation, out.ratio_max_dev)
        return out

    def _backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """One backward pass; ``boundary``: it ends an optimizer step's accumulation (then the step is taken)."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        if boundary:
            self.optimizer_step()
        else:
            self.engine.step()  # DeepSpeed's micro-step bookkeeping only: not a boundary, so no update

    def optimizer_step(self) -> bool:
        """THE place where an optimizer step happens: DeepSpeed clips, steps AdamW and advances the LR schedule at
        the boundary the last backward set (a non-finite gradient skips the update and holds the schedule).
        Returns whether the update was applied."""
        self._step_lr = float(self.engine.get_lr()[0])
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        self.optimizer_steps_taken += 1
        self.optimizer_steps_applied += int(applied)
        if applied:
            self._last_grad_norm = self.engine.get_global_grad_norm()
            if self.ema is not None:  # the EMA follows every APPLIED optimizer step (its warm-up counts them)
                self.ema.step(self.model)
        return applied

    def _record_step(self, kind: str, chunks: list) -> None:
        nan = float("nan")
        ratio = [c.ratio_mean for c in chunks]
        self.step_records.append(OptimizerStepRecord(
            kind=kind, lr=self._step_lr, applied=bool(self.engine.was_step_applied()),
            ratio_mean=sum(ratio) / len(ratio) if ratio else nan,
            ratio_max_dev=max((c.ratio_max_dev for c in chunks), default=nan),
            clip_fraction=sum(c.clip_fraction for c in chunks) / len(chunks) if chunks else nan))

    def _sftaux_micro_step(self, step: int) -> float:
        sft = self.sftaux_sampler.sample(self.args.sftaux_batch_size)
        generator = seeded_generator(self.device, derive_seed(self.args.seed, SEED_SFTAUX, step, self.rank))
        loss = sftaux_objective(self.model, sft.images.to(self.device), sft.captions, generator,
                                text_trains=self.text_trains)
        self._backward(loss * self.args.sftaux_coef, boundary=True)  # last backward of any schedule's rollout
        if self.plan.optimizer_step_schedule == "per_rollout":
            self._record_step("rollout", [])
        else:
            self._record_step("sft", [])
        return float(loss.detach())

    def _finish_step(self, stats: ChunkStats) -> dict[str, float]:
        """Average the chunk statistics over ranks; report how many optimizer steps DeepSpeed applied."""
        taken, applied_steps = self.optimizer_steps_taken, self.optimizer_steps_applied
        self.optimizer_steps_taken = self.optimizer_steps_applied = 0
        if taken != self.plan.optimizer_steps_per_rollout:
            raise RuntimeError(f"the rollout took {taken} optimizer steps, not the "
                               f"{self.plan.optimizer_steps_per_rollout} of --optimizer_step_schedule "
                               f"{self.plan.optimizer_step_schedule}: a step was misplaced.")
        total = ChunkStats.from_tensor(all_reduce_sum(stats.to_tensor(), self.device))
        chunks = max(total.chunks, 1.0)
        applied = applied_steps == taken
        nonfinite = total.nonfinite_losses
        if nonfinite and applied:
            logger.error("a non-finite loss did not stop the optimizer step: check the DeepSpeed config's overflow "
                         "checks (bf16.check_grad_overflow).")
        elif nonfinite:
            logger.warning("step %d: non-finite loss in %d chunk(s): %d of %d optimizer step(s) skipped.",
                           self.state.global_step, int(nonfinite), taken - applied_steps, taken)
        metrics = {"loss/policy": total.policy_loss / chunks, "loss/kl": total.kl / chunks,
                   "policy/clip_fraction": total.clip_fraction / chunks, "policy/ratio_mean": total.ratio_mean / chunks,
                   "train/nonfinite_losses": nonfinite, "train/skipped": 0.0 if applied_steps else 1.0,
                   "train/step_applied": 1.0 if applied else 0.0, "train/optimizer_steps": float(applied_steps)}
        metrics["loss/total"] = metrics["loss/policy"] + self.args.beta * metrics["loss/kl"]
        if applied_steps and self._last_grad_norm is not None:
            metrics["train/grad_norm"] = float(self._last_grad_norm)
        self._last_grad_norm = None
        if self.ema is not None:
            metrics.update(self.ema.metrics())
        return metrics

    def eval_phase(self, step: int) -> dict[str, float]:
        """The periodic UniGenBench evaluation (every rank takes part). Without a hook there is none: the entry
        point's ``build_eval_hook`` already said why, once."""
        if self.eval_hook is None:
            return {}
        try:
            with self._ema_weights():
                return dict(self.eval_hook(self.model, step))
        except Exception as err:  # evaluation must never kill a long training run
            logger.warning("periodic evaluation at step %d failed: %s", step, err)
            return {"eval/failed": 1.0}

    # ----- the loop -------------------------------------------------------------------------------------------

    def training_step(self) -> tuple[dict[str, float], RolloutBatch, RewardBatch]:
        """One GRPO step (every phase timed); the caller advances ``state.global_step``."""
        step = self.state.global_step
        with self.timer("rollout"):  # streamed: decoding and submitting each micro-batch's rewards included
            batch = self.rollout_phase(step)
        self._safe_point("rollout")
        if batch.rewards_in_flight is None:
            with self.timer("decode"):
                self.decode_phase(batch)
            self._safe_point("decode")
        # Serial: the whole reward phase; streamed: time/reward_wait, the scoring the rollout did not hide.
        with self.timer("rewards" if batch.rewards_in_flight is None else "reward_wait"):
            rewards = self.reward_phase(batch)
        self._safe_point("rewards")
        with self.timer("advantages"):
            advantages, metrics = self.advantage_phase(rewards)
        with self.timer("train"):
            metrics.update(self.train_phase(batch, advantages, step))
        metrics.update({f"reward/{k}": v for k, v in rewards.metrics.items() if isinstance(v, (int, float))})
        # Prompts of all ranks whose text was cut to fit --max_prompt_length (the model warned once, with an example).
        metrics["data/truncated_prompts"] = float(all_reduce_sum(
            torch.tensor([float(batch.truncated_prompts)], dtype=torch.float64), self.device)[0])
        return metrics, batch, rewards

    def train(self, resume_from_checkpoint: Optional[str] = None) -> checkpointing.TrainerState:
        args = self.args
        requested = resume_from_checkpoint or args.resume_from_checkpoint
        resume = checkpointing.resolve_resume_path(requested, args.output_dir)
        if checkpointing.is_latest_request(requested):
            resume = checkpointing.agree_on_checkpoint(resume, args.output_dir, self.device)
        if resume is not None:
            self.load(resume)
        metrics_logger = MetricsLogger(args.output_dir, self.tracker, is_main=self.rank == 0,
                                       run_config=self._run_config(), resume_step=self.state.global_step)
        bar = tqdm(total=self.max_steps, initial=self.state.global_step, desc="GRPO",
                   disable=self.rank != 0 or bool(args.disable_tqdm))
        stopped = False
        try:
            if args.eval_before_train and self.state.global_step == 0:  # a fresh run's baseline, not on resume
                self._eval_before_train(metrics_logger)
            with GracefulStop() as stop:
                self._stop = stop
                while self.state.global_step < self.max_steps:
                    start = checkpointing.StepStart.capture(self.prompt_sampler, self.sftaux_sampler)
                    try:
                        metrics, batch, rewards = self.training_step()
                    except StepInterrupted as interrupted:
                        self._rewind(start, str(interrupted))
                        stopped = True
                        break
                    self.state.global_step += 1
                    self._after_step(metrics, batch, rewards, metrics_logger, bar)
                    self._enforce_failure_budget(metrics, rewards)
                    if stop.should_stop(self.device):
                        stopped = True
                        break
            if stopped or self._save_strategy() != "no":
                self.save()
        finally:
            self._stop = None
            bar.close()
            metrics_logger.close()
            if self.rank == 0:
                logger.info("%s", self.summary.text())
                self.summary.write(args.output_dir)
        return self.state

    def _eval_before_train(self, metrics_logger: MetricsLogger) -> None:
        """--eval_before_train: the UniGenBench evaluation of the initial weights, logged as step 0."""
        if self.eval_hook is None:
            if self.rank == 0:
                logger.info("--eval_before_train: skipped, evaluation is off for this run (--eval_freq 0, or no eval "
                            "dataset config / judge: see the warning above).")
            return
        with self.timer("eval"):
            metrics = self.eval_phase(0)
        metrics.update(self.timer.pop())
        metrics_logger.log(0, metrics)
        self.state.log_history.append({"step": 0, **metrics})

    def _enforce_failure_budget(self, metrics: dict, rewards: RewardBatch) -> None:
        """Count the step in the run summary; stop (checkpoint first) when a reward has spent its failure budget."""
        step = self.state.global_step
        counts = step_counts(self.reward_step.names, metrics)
        self.summary.add(metrics.get("train/step_applied") == 1.0, counts)
        message = budget_verdict(self.failure_budget, self.reward_step, step, counts, rewards.failures, self.device)
        if message is None:
            return
        if self._save_strategy() != "no":
            message += (f" {self.save()} holds the run up to step {step}: bring the server back, then resume with "
                        "--resume_from_checkpoint latest.")
        message += " (--max_failed_reward_steps / --max_reward_failure_rate set the budget; 0 / 1 disable them.)"
        self.summary.stopped_because = message
        raise RewardFailureBudgetExceeded(message)

    def _safe_point(self, after: str) -> None:
        """A point inside a step where it may be abandoned for a SIGTERM (collective; see signals.py)."""
        if self._stop is not None:
            self._stop.check(self.device, after)

    def _rewind(self, start: checkpointing.StepStart, where: str) -> None:
        """Undo an abandoned step's draws, so the checkpoint of the last completed step resumes exactly."""
        start.restore(self.prompt_sampler, self.sftaux_sampler)
        if self.rank == 0:
            logger.warning("stop requested: step %d abandoned at a safe point (%s, before its optimizer step); "
                           "checkpointing step %d.", self.state.global_step + 1, where, self.state.global_step)

    def _after_step(self, metrics: dict, batch: RolloutBatch, rewards: RewardBatch, metrics_logger: MetricsLogger,
                    bar) -> None:
        step, args = self.state.global_step, self.args
        if args.eval_freq and step % args.eval_freq == 0:
            with self.timer("eval"):
                metrics.update(self.eval_phase(step))
        with self.timer("log"):
            if args.sample_image_freq and step % args.sample_image_freq == 0:
                sources = group_sources(batch.trajectory.edit, args.rollout_n, args.image_height, args.image_width)
                if self.ema is None:
                    scores = weighted_reward(rewards.scores, rewards.weights).tolist()
                    metrics_logger.log_samples(step, batch.images, batch.trajectory.prompts, scores, args.rollout_n,
                                               sources)
                elif self.rank == 0:  # --ema_decay: the EMA weights' grid (only rank 0 writes grids)
                    metrics_logger.log_samples(step, self.ema_sample_images(batch, step - 1),
                                               batch.trajectory.prompts, None, args.rollout_n, sources)
        metrics.update(self.timer.pop())
        metrics["time/step"] = sum(v for k, v in metrics.items() if k.startswith("time/") and k != "time/step")
        metrics_logger.log(step, metrics)
        self.state.log_history.append({"step": step, **metrics})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.4f}",
                        loss=f"{metrics.get('loss/total', float('nan')):.3g}")
        if self._save_strategy() == "steps" and step % self._save_every() == 0 and step < self.max_steps:
            self.save()

    def _ema_weights(self):
        """The EMA swapped into the model (then the live weights restored), or nothing when --ema_decay is 0."""
        return self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext()

    def ema_sample_images(self, batch: RolloutBatch, step: int) -> torch.Tensor:
        """The grid under --ema_decay: the EMA weights' images of step ``step``'s prompts, from its rollout seed."""
        generator = seeded_generator(self.device, derive_seed(self.args.seed, SEED_ROLLOUT, step, self.rank))
        return ema_sample_images(self.ema, self.model, batch.unique_prompts, self.args, generator,
                                 batch.trajectory.edit)

    # ----- checkpoints ----------------------------------------------------------------------------------------

    def _save_strategy(self) -> str:
        strategy = self.args.save_strategy
        return str(getattr(strategy, "value", strategy))

    def _save_every(self) -> int:
        every = self.args.save_steps
        return max(1, math.ceil(every * self.max_steps) if every < 1 else int(every))

    def save(self) -> Path:
        if self._last_saved_step == self.state.global_step:  # e.g. a SIGTERM right after a periodic save
            return Path(self.args.output_dir) / f"{checkpointing.CHECKPOINT_PREFIX}{self.state.global_step}"
        self.state.prompt_sampler = self.prompt_sampler.state_dict()
        if self.sftaux_sampler is not None:
            self.state.sftaux_sampler = self.sftaux_sampler.state_dict()
        local_rank = int(getattr(self.engine, "local_rank", 0) or 0)
        renamer = self.rank == 0 or (bool(self.args.save_on_each_node) and local_rank == 0)
        ema_state = self.ema.state_dict() if self.ema is not None and self.rank == 0 else None
        extra = {NFT_STATE_NAME: self.nft.state_dict()} if self.nft is not None and self.rank == 0 else None
        path = checkpointing.save_checkpoint(self.engine, self.args.output_dir, self.state, rank=self.rank,
                                             renamer=renamer, save_total_limit=self.args.save_total_limit,
                                             ema_state=ema_state, extra_states=extra)
        self._last_saved_step = self.state.global_step
        return path

    def load(self, path: str | Path) -> None:
        state = checkpointing.load_checkpoint(self.engine, path, rank=self.rank, world_size=self.world_size,
                                              reset_optimizer=self.args.resume_reset_optimizer)
        if state.world_size != self.world_size or state.global_batch_size != self.args.global_batch_size:
            logger.warning("%s was saved with world size %d and global batch %d; now %d and %d: the prompt sequence "
                           "will differ from an uninterrupted run.", path, state.world_size, state.global_batch_size,
                           self.world_size, self.args.global_batch_size)
        self.prompt_sampler.load_state_dict(state.prompt_sampler)
        if self.sftaux_sampler is not None and state.sftaux_sampler:
            self.sftaux_sampler.load_state_dict(state.sftaux_sampler)
        if self.ema is not None:
            self.ema.load_checkpoint(self.model, Path(path))
        if self.nft is not None:
            self.nft.load_checkpoint(self.model, Path(path), source=checkpointing.RESUME_FLAG)
        state.max_steps, state.world_size = self.max_steps, self.world_size
        state.global_batch_size = self.args.global_batch_size
        self.state = state
        self._last_saved_step = state.global_step
        if self.rank == 0:
            logger.info("resumed from %s at step %d", path, state.global_step)

    def _run_config(self) -> dict:
        config = {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool)) or v is None}
        config.update({"world_size": self.world_size, "trained_modules": ",".join(self.trained_modules),
                       "gradient_accumulation_steps": self.plan.gradient_accumulation_steps})
        return config

    def close(self) -> None:
        """Release the reward clients' threads/connections."""
        close = getattr(self.reward_step, "close", None)
        if close is not None:
            close()
