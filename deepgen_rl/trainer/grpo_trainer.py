"""DeepGenGRPOTrainer: rollout -> decode -> rewards -> advantages -> optimizer step(s), under DeepSpeed.

One GRPO step on every rank (docs/algorithms.md#one-grpo-step; legend: B prompts per rank, G = rollout_n, N = B*G):

    rollout     B prompts from the seeded sampler, G SDE samples each (recorded latents, log-probs, embeddings;
                with --sde_window_size only the window is SDE and recorded: sde_window.py)
    decode      VAE -> N images
    rewards     the prompt's datasets' reward functions, concurrently (failed samples are masked, not zeroed);
                with --stream_rewards decode and scoring start per rollout micro-batch (streaming.py)
    advantages  GRPO / GDPO, normalised over ALL ranks (a collective)
    train       per actor update (--atrain_num_actor_update_steps parts of the N samples): int(T x
                timestep_fraction) drawn steps x ceil(S / atrain_micro_batch_size) chunks, each a backward of its
                share of the loss; + the SFT-aux batch; optimizer steps as --optimizer_step_schedule says
                (batching.py), all taken in ``StepUpdate.optimizer_step`` (updater.py; the first chunk's ratio is 1)
    eval / log  UniGenBench every --eval_freq steps (hook); metrics, sample grids, checkpoints (run_checkpoints.py)

The run around the steps (resume, SIGTERM safe points, the reward failure budget) is run_loop.py's, above this
module: its ``TrainingRun`` adds ``train()`` to this class.

Departures from the DeepGen-RL reference: failed rewards are excluded instead of scored 0 / 0.5; a non-finite
loss skips the optimizer step instead of corrupting the weights; GDPO normalises over all ranks; gradient
accumulation is derived, so any NNODES x NGPUS works; resume needs no DeepSpeed patch.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from deepgen_rl.model.prompt_padding import longest_chat_text, padded_to_at_least
from deepgen_rl.model.vision_tower import drop_vision_tower
from deepgen_rl.perf.mfu import StepPerfCounter, conditioning_tokens
from deepgen_rl.trainer.edit_rollout import has_edit_datasets, row_sources, row_targets, step_edit_conditioning
from deepgen_rl.rewards.reward_step import RewardBatch
from deepgen_rl.rl import AdvantageResult
from deepgen_rl.sampling import encode_conditioning, rollout

import deepgen_rl.trainer.checkpointing as checkpointing
import deepgen_rl.trainer.run_checkpoints as run_checkpoints

from .advantage_step import global_advantages
from .batching import BatchPlan, plan_batches, total_training_steps
from .deepspeed_setup import initialize_engine, zero_stage
from ..core.distributed import all_reduce, all_reduce_sum, rank_and_world
from ..core.sftaux_batch import rank_items
from .ema import EmaCounters
from .ema_shards import ema_from_args
from .divergence import SkipBudget, TrainingDiverged, check_trained_weights, stop_message
from .eval_hook import EvalHook
from .failure_budget import FailureBudget, RunSummary
from .hacking import build_monitor, monitor_metrics, submit_images
from .kl_forward import effective_kl_forward
from .global_draws import rollout_noise, sftaux_noise
from .logging_utils import MetricsLogger, TrackerSettings
from .nft import NftOldPolicy
from .objective import ObjectiveSettings, policy_chunk_objective, sftaux_objective
from .reference_policy import ReferencePolicy
from .rollout_batch import RolloutBatch
from .sample_grid import log_sample_grid
from .sde_window import draw_sde_window
from .signals import GracefulStop
from .step_metrics import PhaseTimer
from .streaming import RewardStream, decode_chunks, log_chunking, reward_chunks
from .trainable import LoraSettings, configure_trainable
from .update_plan import OptimizerStepRecord
from .updater import SKIPPED_UPDATE, StepUpdate, draw_update, first_chunk_warning

logger = logging.getLogger(__name__)


class DeepGenGRPOTrainer:
    """GRPO steps for the DeepGen model; run_loop.TrainingRun's ``train()`` runs them to --max_steps (or the epochs'
    worth of prompts)."""

    def __init__(self, model: torch.nn.Module, args, *, prompt_sampler, reward_step, num_prompts: int,
                 trainable_modules: str = "dit", lora: Optional[LoraSettings] = None, sftaux_sampler=None,
                 eval_hook: Optional[EvalHook] = None, tracker: Optional[TrackerSettings] = None,
                 model_flags: Optional[dict] = None) -> None:
        self.args = args
        # Recorded in the run config (trackers, every checkpoint's trainer_state.json): model paths, LoRA, ...
        self.model_flags, self.lora = dict(model_flags or {}), lora
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
        # perf/ metrics (docs/compute.md): the step's FLOPs counted on a meta copy taken before ZeRO-3 partitions.
        self.perf = StepPerfCounter.prepare(model, args, self.plan, text_trains=self.text_trains,
                                            sftaux=self.sftaux_sampler is not None, rank=self.rank)
        # The LR schedule and its warm-up count optimizer steps (several per rollout unless per_rollout).
        parts = initialize_engine(model, args, self.plan, self.max_steps * self.plan.optimizer_steps_per_rollout)
        self.engine, self.ds_config = parts.engine, parts.config
        self.model = self.engine.module
        self.device = torch.device(self.engine.device)
        # --kl_forward as run (ZeRO-3 runs 'separate'); it matters only where the schedule steps on beta*KL alone.
        if self.perf is not None:
            self.perf.zero_stage = zero_stage(self.ds_config)
        self.kl_forward = effective_kl_forward(args.kl_forward, zero_stage(self.ds_config),
                                               steps_on_kl=self.plan.optimizer_step_schedule == "reference"
                                               and self.plan.kl_step)
        if self.reference is not None:
            self.reference.to(self.device, dtype=next(self.model.transformer.parameters()).dtype)
        if self.nft is not None:
            self.nft.to(self.device, dtype=next(self.model.transformer.parameters()).dtype)
        # --ema_decay (None when 0); --ema_device gpu: sharded beside the engine's fp32 master partition
        self.ema: Optional[EmaCounters] = ema_from_args(self.model, args, self.engine)
        self.objective = ObjectiveSettings.from_args(args)
        self.state = checkpointing.TrainerState(max_steps=self.max_steps, world_size=self.world_size,
                                                global_batch_size=args.global_batch_size)
        self.timer = PhaseTimer()
        self.failure_budget = FailureBudget(args.max_failed_reward_steps, args.max_reward_failure_rate,
                                            args.reward_failure_window)
        self.summary = RunSummary()
        self.skip_budget = SkipBudget(args.max_skipped_steps)  # the divergence guard (divergence.py)
        self.monitor = build_monitor(args, self.rank)  # reward-hacking alarms (trainer/hacking.py)
        self._stop: Optional[GracefulStop] = None  # set while train() runs: its safe points may stop a step
        self._last_saved_step: Optional[int] = None
        self.step_records: list[OptimizerStepRecord] = []  # the current GRPO step's optimizer steps (updater.py)
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
        # One noise stream per sample, keyed by its global index: any world size draws the same (global_draws.py)
        generator = rollout_noise(args.seed, step, self.rank, self.plan.samples_per_rank, self.device)
        window = draw_sde_window(args, step)  # the same on every rank (seeded by the step)
        prompt_length = self._global_prompt_length(samples)
        edit = step_edit_conditioning(self.model, samples, args.rollout_n, args.image_height, args.image_width)
        stream = (RewardStream(self.model, self.reward_step, samples, args.rollout_n, args.rollout_micro_batch_size,
                               args.vae_decode_micro_batch_size, edit) if args.stream_rewards else None)
        self.model.eval()
        # DiffusionNFT: the old policy rolls out with the deterministic ODE (trainer/nft.py).
        with padded_to_at_least(prompt_length):
            trajectory = self._rollout(samples, generator, window, stream, edit)
        truncated = sum(self.model.format_prompts([s.prompt for s in samples]).truncated)
        batch = RolloutBatch(samples=samples, trajectory=trajectory, truncated_prompts=truncated, sde_window=window,
                             rewards_in_flight=stream, prompt_length=prompt_length)
        if stream is not None:
            batch.images = stream.images
            trajectory.release_final()
        return batch

    def _global_prompt_length(self, samples) -> int:
        """The longest chat text of the step's prompts on ALL ranks (a collective): every rank pads its prompt
        batch to it, as one rank encoding the whole batch would (model/prompt_padding.py)."""
        prompts = [s.prompt for s in samples if not s.is_edit]  # edit prompts keep their own batch's length
        local = longest_chat_text(self.model, prompts, self.args.rollout_cfg_scale > 0) if prompts else 0
        return int(all_reduce(torch.tensor([float(local)]), self.device, op="max").item())

    def _rollout(self, samples, generator, window, stream, edit):
        args = self.args
        return rollout(
            self.model if self.nft is None else self.nft.rollout_model, [s.prompt for s in samples],
            group_size=args.rollout_n, sampler=args.atrain_sde_sampler if self.nft is None else "ode",
            eta=args.sde_eta, logprob_variant=args.logprob_variant, num_inference_steps=args.num_inference_steps,
            height=args.image_height, width=args.image_width, cfg_scale=args.rollout_cfg_scale,
            init_same_noise=args.init_same_noise, generator=generator,
            micro_batch_size=args.rollout_micro_batch_size, sde_window=window,
            on_micro_batch=None if stream is None else stream.on_micro_batch,
            record_means=args.atrain_algorithm == "grpoguard", edit=edit,
            forward_rows=None if self.nft is not None else self.plan.forward_rows(args.rollout_micro_batch_size))

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
        return global_advantages(rewards, self.args, self.device, self.state.global_step)

    def train_phase(self, batch: RolloutBatch, advantages: Optional[AdvantageResult], step: int) -> dict[str, float]:
        """Every actor update's drawn timesteps in chunks (+ SFT-aux), stepped as --optimizer_step_schedule says
        (the machinery: updater.py)."""
        if advantages is None:
            return dict(SKIPPED_UPDATE)
        args, plan, trajectory = self.args, self.plan, batch.trajectory
        steps, parts = draw_update(args, plan, batch.sde_window, step, self.rank, trajectory.num_samples)
        ctx = StepUpdate(engine=self.engine, model=self.model, plan=plan, ema=self.ema, device=self.device,
                         objective=self._chunk_objective, safe_point=self._safe_point, batch=batch,
                         adv=advantages.advantages.to(self.device), valid=advantages.valid.to(self.device),
                         policy_share=1.0 - args.sftaux_coef if self.sftaux_sampler is not None else 1.0,
                         global_step=self.state.global_step, kl_forward=self.kl_forward,
                         world_size=self.world_size)
        if self.nft is not None:  # DiffusionNFT: "timestep" i is column i of per-sample random sigmas (nft.py)
            ctx.nft_draw = self.nft.draw(trajectory, len(steps), seed=args.seed, step=step,
                                         first_sample=self.rank * plan.samples_per_rank)
            steps = list(range(len(steps)))
        if self.reference is not None and self.text_trains:
            with padded_to_at_least(batch.prompt_length):
                ctx.reference_conditioning = self.reference.conditioning(batch.unique_prompts, args.rollout_n,
                                                                         args.rollout_cfg_scale, trajectory.edit)
        self.step_records = ctx.records
        lr = float(self.engine.get_lr()[0])
        self.model.train()
        for step_index, chunks, denominator, last in ctx.schedule(parts, steps, advantages.valid.cpu(),
                                                                  sftaux=self.sftaux_sampler is not None):
            self._train_timestep(ctx, step_index, chunks, denominator, last_backward=last)
        metrics = ctx.policy_metrics(lr)
        if self.nft is None:  # the worst rank's first chunk: one rank's kernels can deviate alone
            worst = all_reduce(torch.tensor([ctx.first_deviation], dtype=torch.float64).nan_to_num(-1.0), self.device,
                               op="max").item()
            metrics["policy/first_chunk_ratio_max_dev"] = worst if worst >= 0 else float("nan")  # NaN: no chunk
            warning = first_chunk_warning(metrics["policy/first_chunk_ratio_max_dev"], args.clip_range)
            if warning is not None and self.rank == 0:
                logger.warning("step %d: %s", step, warning)
        if self.sftaux_sampler is not None:
            share, item_loss_sum = self._sftaux_loss(step)
            ctx.sftaux_backward(share, args.sftaux_coef)
            # the mean over every item of the step (all ranks): the same metric on any world size
            metrics["loss/sft"] = float(all_reduce_sum(torch.tensor([item_loss_sum], dtype=torch.float64),
                                                       self.device)) / args.sftaux_global_batch_size
        metrics.update(ctx.finish(args.beta))
        if self.nft is not None:  # old <- d old + (1 - d) theta, after the step's optimizer steps
            self.nft.update(self.model, int(metrics["train/optimizer_steps"]))
            metrics.update(self.nft.metrics(self.device))
        return metrics

    def _train_timestep(self, ctx: StepUpdate, step_index: int, chunks, denominator: float, *,
                        last_backward: bool) -> None:
        """One drawn timestep of one actor update (StepUpdate.train_timestep): the unit the update loop runs."""
        ctx.train_timestep(step_index, chunks, denominator, last_backward=last_backward)

    def _chunk_objective(self, ctx: StepUpdate, step_index: int, rows):
        """One chunk's objective under the current weights: DiffusionNFT's, or GRPO / GRPO-Guard's."""
        args = self.args
        conditioning = None
        if self.text_trains:  # re-encoded under the current weights, padded as the rollout was
            with padded_to_at_least(ctx.batch.prompt_length):
                conditioning = encode_conditioning(self.model, ctx.batch.unique_prompts, args.rollout_n,
                                                   args.rollout_cfg_scale, ctx.batch.trajectory.edit)
        if self.nft is not None:
            return self.nft.chunk_objective(self.model, ctx.batch.trajectory, ctx.nft_draw, step_index, rows,
                                            advantages=ctx.adv, valid=ctx.valid, beta=args.beta,
                                            reference=self.reference,
                                            reference_conditioning=ctx.reference_conditioning,
                                            conditioning=conditioning)
        return policy_chunk_objective(self.model, ctx.batch.trajectory, step_index, rows, advantages=ctx.adv,
                                      valid=ctx.valid, settings=self.objective, reference=self.reference,
                                      reference_conditioning=ctx.reference_conditioning, conditioning=conditioning)

    def _sftaux_loss(self, step: int) -> tuple[torch.Tensor, float]:
        """(L_r, sum of its items' losses): this rank's share of the flow-matching loss of the step's
        --sftaux_global_batch_size items, normalised so that DeepSpeed's average over ranks is their mean on any
        world size (core/sftaux_batch.py; each item's draws keyed by its global index). A rank with no item runs
        one at weight 0, so that every rank runs the same backward (ZeRO's gradient buckets stay in step)."""
        items = rank_items(self.args.sftaux_global_batch_size, self.world_size, self.rank)
        first, count = items.drawn
        sft = self.sftaux_sampler.sample(first, count)
        generator = sftaux_noise(self.args.seed, step, first, count, self.device)
        mean = sftaux_objective(self.model, sft.images.to(self.device), sft.captions, generator,
                                text_trains=self.text_trains)
        return mean * items.loss_scale, float(mean.detach()) * items.count if items.count else 0.0

    def eval_phase(self, step: int) -> dict[str, float]:
        """The periodic UniGenBench evaluation (every rank takes part). Without a hook there is none: the entry
        point's ``build_eval_hook`` already said why, once."""
        if self.eval_hook is None:
            return {}
        try:
            # --ema_decay: evaluated with the EMA weights swapped in (then the live weights restored)
            with self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext():
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
        submit_images(self.monitor, batch)  # image statistics on the monitor's thread while the step trains
        self._safe_point("rewards")
        with self.timer("advantages"):
            advantages, metrics = self.advantage_phase(rewards)
        with self.timer("train"):
            metrics.update(self.train_phase(batch, advantages, step))
        metrics.update({f"reward/{k}": v for k, v in rewards.metrics.items() if isinstance(v, (int, float))})
        # Over all ranks: prompts whose text was cut to fit --max_prompt_length (the model warned once, with an
        # example), and samples whose image held NaN/inf (failed, never scored: the divergence guard counts them).
        totals = all_reduce_sum(torch.tensor([float(batch.truncated_prompts),
                                              rewards.metrics.get("nonfinite_images", 0.0)], dtype=torch.float64),
                                self.device)
        metrics["data/truncated_prompts"], metrics["reward/nonfinite_images"] = float(totals[0]), float(totals[1])
        return metrics, batch, rewards

    def _eval_before_train(self, metrics_logger: MetricsLogger) -> None:
        """--eval_before_train: the UniGenBench evaluation of the initial weights, logged as step 0."""
        if self.eval_hook is None:
            if self.rank == 0:
                reason = ("--eval_freq 0" if self.args.eval_freq <= 0
                          else "no eval dataset config or judge: see the warning above")
                logger.info("--eval_before_train: skipped, evaluation is off for this run (%s).", reason)
            return
        with self.timer("eval"):
            metrics = self.eval_phase(0)
        self.monitor.observe_eval(0, metrics)
        metrics.update(self.timer.pop())
        metrics_logger.log(0, metrics)
        self.state.log_history.append({"step": 0, **metrics})

    def _safe_point(self, after: str) -> None:
        """A point inside a step where it may be abandoned for a SIGTERM (collective; see signals.py)."""
        if self._stop is not None:
            self._stop.check(self.device, after)

    def _after_step(self, metrics: dict, batch: RolloutBatch, rewards: RewardBatch, metrics_logger: MetricsLogger,
                    bar) -> None:
        step, args = self.state.global_step, self.args
        if args.eval_freq and step % args.eval_freq == 0:
            with self.timer("eval"):
                metrics.update(self.eval_phase(step))
        metrics.update(monitor_metrics(self, step, metrics))  # collective
        with self.timer("log"):
            if args.sample_image_freq and step % args.sample_image_freq == 0:
                log_sample_grid(self, metrics_logger, batch, rewards, step)
        metrics.update(self.timer.pop())
        metrics["time/step"] = sum(v for k, v in metrics.items() if k.startswith("time/") and k != "time/step")
        if self.perf is not None:
            metrics.update(self.perf.metrics(metrics, conditioning_tokens(batch)))
        metrics_logger.log(step, metrics)
        self.state.log_history.append({"step": step, **metrics})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.4f}",
                        loss=f"{metrics.get('loss/total', float('nan')):.3g}")
        every = run_checkpoints.save_every(args, self.max_steps)
        if run_checkpoints.save_strategy(args) == "steps" and step % every == 0 and step < self.max_steps:
            self.save()

    # ----- checkpoints ----------------------------------------------------------------------------------------

    def save(self) -> Path:
        """checkpoint-<global_step> (collective; run_checkpoints.py), once per step."""
        if self._last_saved_step == self.state.global_step:  # e.g. a SIGTERM right after a periodic save
            return Path(self.args.output_dir) / f"{checkpointing.CHECKPOINT_PREFIX}{self.state.global_step}"
        self.timer.mark("save")
        check = check_trained_weights(self.model, self.device)  # collective, before anything is written
        if not check.finite:
            reason = (f"at step {self.state.global_step} the trained weights hold NaN/inf "
                      f"({', '.join(check.bad) or 'on another rank'})")
            self.summary.stopped_because = stop_message(reason, self.args.output_dir,
                                                        self.skip_budget.first_skipped_step)
            raise TrainingDiverged(self.summary.stopped_because)
        self.state.weights_finite, self.state.trained_weight_norm = True, check.norm
        try:
            path = run_checkpoints.save_run(self.engine, self.args, self.state, rank=self.rank,
                                            prompt_sampler=self.prompt_sampler, sftaux_sampler=self.sftaux_sampler,
                                            ema=self.ema, nft=self.nft)
        except checkpointing.CheckpointSaveError as err:
            self.summary.stopped_because = str(err)
            raise
        self._last_saved_step = self.state.global_step
        self.monitor.on_save(self.state.global_step, path)  # best_checkpoint.json
        self.monitor.plot()
        return path

    def load(self, path: str | Path) -> None:
        self.state = run_checkpoints.load_run(self.engine, self.args, path, rank=self.rank,
                                              world_size=self.world_size, max_steps=self.max_steps, model=self.model,
                                              prompt_sampler=self.prompt_sampler,
                                              sftaux_sampler=self.sftaux_sampler, ema=self.ema, nft=self.nft)
        self._last_saved_step = self.state.global_step
        root = Path(self.args.output_dir)
        self.monitor.replay(self.state.log_history, [checkpointing.checkpoint_step(p)
                                                     for p in checkpointing.list_checkpoints(root)], root)

    def close(self) -> None:
        """Release the reward clients' threads/connections and the eval hook's own clients."""
        self.monitor.close()
        close = getattr(self.reward_step, "close", None)
        if close is not None:
            close()
        close_eval = getattr(self.eval_hook, "close", None)  # a plain function hook (tests) owns nothing
        if close_eval is not None:
            close_eval()
