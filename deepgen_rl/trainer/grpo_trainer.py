"""DeepGenGRPOTrainer: rollout -> decode -> rewards -> advantages -> one optimizer step, under DeepSpeed.

One GRPO step on every rank (DESIGN.md section 3; legend: B prompts per rank, G = rollout_n, N = B*G):

    rollout     B prompts from the seeded sampler, G SDE samples each (recorded latents, log-probs, embeddings)
    decode      VAE -> N images
    rewards     the prompt's datasets' reward functions, concurrently (failed samples are masked, not zeroed)
    advantages  GRPO / GDPO, normalised over ALL ranks (a collective)
    train       int(T x timestep_fraction) drawn steps x ceil(N / atrain_micro_batch_size) chunks, each a
                backward of its share of the loss; + the SFT-aux batch; ONE optimizer step (DeepSpeed GAS = the
                number of those backward passes, so the first chunk's ratio is exactly 1)
    eval / log  UniGenBench every --eval_freq steps (hook); metrics, sample grids, checkpoints

Departures from the DeepGen-RL reference: failed rewards are excluded instead of scored 0 / 0.5; a non-finite
loss skips the optimizer step instead of corrupting the weights; GDPO normalises over all ranks; gradient
accumulation is derived, so any NNODES x NGPUS works; resume needs no DeepSpeed patch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from deepgen_rl.data import PromptSample
from deepgen_rl.model.vision_tower import drop_vision_tower
from deepgen_rl.rewards.reward_step import RewardBatch
from deepgen_rl.rl import AdvantageResult, compute_advantages, sample_train_steps
from deepgen_rl.sampling import Trajectory, decode_images, encode_conditioning, rollout
from deepgen_rl.sampling.trajectory import split_rows

from . import checkpointing
from .batching import BatchPlan, plan_batches, total_training_steps
from .deepspeed_setup import initialize_engine
from ..distributed import (SEED_ROLLOUT, SEED_SFTAUX, SEED_TRAIN_STEPS, all_gather_cat, all_reduce_sum, derive_seed,
                          rank_and_world, seeded_generator)
from .ema import EMA, ema_sample_images
from .eval_hook import EvalHook
from .failure_budget import FailureBudget, RewardFailureBudgetExceeded, RunSummary, budget_verdict, step_counts
from .logging_utils import MetricsLogger, TrackerSettings
from .objective import ObjectiveSettings, policy_chunk_objective, sftaux_objective
from .reference_policy import ReferencePolicy
from .signals import GracefulStop, StepInterrupted
from .step_metrics import PhaseTimer, advantage_metrics, reward_metrics, weighted_reward
from .trainable import LoraSettings, configure_trainable

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """This rank's rollout: B prompt samples (each with dataset + reward weights) and the N-row trajectory."""

    samples: list[PromptSample]
    trajectory: Trajectory
    images: Optional[torch.Tensor] = None  # [N, 3, H, W] in [0, 1]
    truncated_prompts: int = 0  # of the B prompts, cut to --max_prompt_length (their user text only)

    @property
    def unique_prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]


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
        drop_vision_tower(model)  # text-to-image only: keeps ~1.25 GiB off each GPU (model/vision_tower.py)
        self.text_trains = any(name != "transformer" for name in self.trained_modules)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # The reference must be copied BEFORE deepspeed.initialize (ZeRO-3 partitions the live weights).
        self.reference: Optional[ReferencePolicy] = None
        if args.beta > 0:
            self.reference = (ReferencePolicy.adapters_disabled(model) if lora is not None
                              else ReferencePolicy.frozen_copy(model, self.trained_modules))
        self.plan: BatchPlan = plan_batches(
            global_batch_size=args.global_batch_size, rollout_n=args.rollout_n, world_size=self.world_size,
            atrain_micro_batch_size=args.atrain_micro_batch_size, num_train_timesteps=args.num_train_timesteps,
            sftaux_enabled=self.sftaux_sampler is not None)
        self.max_steps = total_training_steps(max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
                                              num_prompts=num_prompts, prompts_per_step=self.plan.prompts_per_step)
        parts = initialize_engine(model, args, self.plan, self.max_steps)
        self.engine, self.ds_config = parts.engine, parts.config
        self.model = self.engine.module
        self.device = torch.device(self.engine.device)
        if self.reference is not None:
            self.reference.to(self.device, dtype=next(self.model.transformer.parameters()).dtype)
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
        if self.rank == 0:
            logger.info("batch plan: %s; %d optimizer steps", self.plan, self.max_steps)

    # ----- phases ---------------------------------------------------------------------------------------------

    def rollout_phase(self, step: int) -> RolloutBatch:
        """Draw this rank's B prompts and sample G trajectories each (no gradients)."""
        args = self.args
        samples = self.prompt_sampler.sample(self.plan.prompts_per_rank)
        generator = seeded_generator(self.device, derive_seed(args.seed, SEED_ROLLOUT, step, self.rank))
        self.model.eval()
        trajectory = rollout(
            self.model, [s.prompt for s in samples], group_size=args.rollout_n, sampler=args.atrain_sde_sampler,
            eta=args.sde_eta, logprob_variant=args.logprob_variant, num_inference_steps=args.num_inference_steps,
            height=args.image_height, width=args.image_width, cfg_scale=args.rollout_cfg_scale,
            init_same_noise=args.init_same_noise, generator=generator,
            micro_batch_size=args.rollout_micro_batch_size)
        truncated = sum(self.model.format_prompts([s.prompt for s in samples]).truncated)
        return RolloutBatch(samples=samples, trajectory=trajectory, truncated_prompts=truncated)

    def decode_phase(self, batch: RolloutBatch) -> None:
        batch.images = decode_images(self.model, batch.trajectory.latents[:, -1], self.args.vae_decode_micro_batch_size)

    def reward_phase(self, batch: RolloutBatch) -> RewardBatch:
        """This rank's N samples scored by their datasets' rewards (scores [N, K], weights, failed mask)."""
        group = self.args.rollout_n
        weights = [s.reward_weights for s in batch.samples for _ in range(group)]
        group_ids = [b for b in range(len(batch.samples)) for _ in range(group)]
        return self.reward_step.score(batch.images, batch.trajectory.prompts, weights, group_ids)

    def advantage_phase(self, rewards: RewardBatch) -> tuple[Optional[AdvantageResult], dict[str, float]]:
        """Advantages over all ranks (collective), or None when no sample of any rank has a reward."""
        valid = ~rewards.failed
        names = list(rewards.names)
        metrics = reward_metrics(names, all_gather_cat(rewards.scores, self.device),
                                 all_gather_cat(rewards.weights, self.device),
                                 all_gather_cat(rewards.failed, self.device))
        if metrics["reward/failed_samples"] >= metrics["reward/num_samples"]:
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
        """All GRPO chunks (+ SFT-aux) of the step, accumulated into ONE optimizer step."""
        if advantages is None:
            return {"train/skipped": 1.0, "train/step_applied": 0.0}
        args, plan, trajectory = self.args, self.plan, batch.trajectory
        # One draw shared by every rank (seeded by the step only).
        steps_generator = seeded_generator(torch.device("cpu"), derive_seed(args.seed, SEED_TRAIN_STEPS, step))
        steps = sample_train_steps(args.num_inference_steps, args.timestep_fraction, steps_generator)
        chunks = split_rows(trajectory.num_samples, plan.train_micro_batch_size)
        assert len(steps) * len(chunks) == plan.policy_micro_steps, "batch plan and drawn steps disagree"
        adv, valid = advantages.advantages.to(self.device), advantages.valid.to(self.device)
        reference_conditioning = None
        if self.reference is not None and self.text_trains:
            reference_conditioning = self.reference.conditioning(batch.unique_prompts, args.rollout_n,
                                                                 args.rollout_cfg_scale)
        policy_share = 1.0 - args.sftaux_coef if self.sftaux_sampler is not None else 1.0
        denominator = max(int(valid.sum()), 1) * len(steps)
        sums = torch.zeros(6, dtype=torch.float64)  # policy, kl, clip, ratio, non-finite losses, policy chunks
        first_deviation = float("nan")
        lr = float(self.engine.get_lr()[0])
        self.model.train()
        for step_index in steps:
            for rows in chunks:
                self._safe_point("training chunk")  # before the optimizer step: nothing of this step applied yet
                conditioning = (encode_conditioning(self.model, batch.unique_prompts, args.rollout_n,
                                                    args.rollout_cfg_scale) if self.text_trains else None)
                out = policy_chunk_objective(self.model, trajectory, step_index, rows, advantages=adv, valid=valid,
                                             settings=self.objective, reference=self.reference,
                                             reference_conditioning=reference_conditioning, conditioning=conditioning)
                if math.isnan(first_deviation):
                    first_deviation = out.ratio_max_dev
                # Each chunk's share of the rank's masked mean over (drawn steps x valid samples); the convex
                # SFT-aux mix L = (1 - lambda) L_grpo + lambda L_sft is applied as per-backward weights.
                self.engine.backward(out.loss * (policy_share * out.num_valid / denominator), scale_wrt_gas=False)
                self.engine.step()
                finite = math.isfinite(float(out.loss.detach()))
                sums += torch.tensor([out.policy_loss, out.kl, out.clip_fraction, out.ratio_mean,
                                      0.0 if finite else 1.0, 1.0], dtype=torch.float64)
        metrics = {"train/lr": lr, "policy/first_chunk_ratio_max_dev": first_deviation}
        if self.sftaux_sampler is not None:
            metrics["loss/sft"] = self._sftaux_micro_step(step)
            sums[4] += 0.0 if math.isfinite(metrics["loss/sft"]) else 1.0
        return {**metrics, **self._finish_step(sums)}

    def _sftaux_micro_step(self, step: int) -> float:
        sft = self.sftaux_sampler.sample(self.args.sftaux_batch_size)
        generator = seeded_generator(self.device, derive_seed(self.args.seed, SEED_SFTAUX, step, self.rank))
        loss = sftaux_objective(self.model, sft.images.to(self.device), sft.captions, generator,
                                text_trains=self.text_trains)
        self.engine.backward(loss * self.args.sftaux_coef, scale_wrt_gas=False)
        self.engine.step()
        return float(loss.detach())

    def _finish_step(self, sums: torch.Tensor) -> dict[str, float]:
        """Average the chunk statistics over ranks; report whether DeepSpeed applied the optimizer step."""
        if self.engine.micro_steps % self.plan.gradient_accumulation_steps:
            raise RuntimeError(f"DeepSpeed ran {self.engine.micro_steps} micro-steps, not a multiple of the batch "
                               f"plan's {self.plan.gradient_accumulation_steps}: the optimizer step would be "
                               "misplaced.")
        total = all_reduce_sum(sums, self.device)
        chunks = float(total[5].clamp_min(1))
        applied = bool(self.engine.was_step_applied())
        # --- EMA (issue 13 item 5): right after each APPLIED optimizer step; moves with the optimizer stepping. ---
        if applied and self.ema is not None:
            self.ema.step(self.model)
        nonfinite = float(total[4])
        if nonfinite and applied:
            logger.error("a non-finite loss did not stop the optimizer step: check the DeepSpeed config's overflow "
                         "checks (bf16.check_grad_overflow).")
        elif nonfinite:
            logger.warning("step %d: non-finite loss in %d chunk(s): optimizer step skipped.",
                           self.state.global_step, int(nonfinite))
        grad_norm = self.engine.get_global_grad_norm() if applied else None
        metrics = {"loss/policy": float(total[0]) / chunks, "loss/kl": float(total[1]) / chunks,
                   "policy/clip_fraction": float(total[2]) / chunks, "policy/ratio_mean": float(total[3]) / chunks,
                   "train/nonfinite_losses": nonfinite, "train/skipped": 0.0 if applied else 1.0,
                   "train/step_applied": 1.0 if applied else 0.0}
        metrics["loss/total"] = metrics["loss/policy"] + self.args.beta * metrics["loss/kl"]
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
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
        with self.timer("rollout"):
            batch = self.rollout_phase(step)
        self._safe_point("rollout")
        with self.timer("decode"):
            self.decode_phase(batch)
        self._safe_point("decode")
        with self.timer("rewards"):
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
                if self.ema is None:
                    scores = weighted_reward(rewards.scores, rewards.weights).tolist()
                    metrics_logger.log_samples(step, batch.images, batch.trajectory.prompts, scores, args.rollout_n)
                elif self.rank == 0:  # --ema_decay: the EMA weights' grid (only rank 0 writes grids)
                    metrics_logger.log_samples(step, self.ema_sample_images(batch, step - 1),
                                               batch.trajectory.prompts, None, args.rollout_n)
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
        return ema_sample_images(self.ema, self.model, batch.unique_prompts, self.args, generator)

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
        path = checkpointing.save_checkpoint(self.engine, self.args.output_dir, self.state, rank=self.rank,
                                             renamer=renamer, save_total_limit=self.args.save_total_limit,
                                             ema_state=ema_state)
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
