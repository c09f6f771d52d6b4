"""UniGenBench evaluation: generate with the eval settings, judge every image, aggregate, report.

Work plan: every (dataset, prompt, duplicate) is one image; the global list is dealt round-robin over the
ranks (image k -> rank k % world_size), so each rank generates AND judges its own share (the reference
generated everywhere but judged all 2,400 images on rank 0 while the other ranks waited at a barrier). A
rank overlaps its work: the judge requests of one generated batch run in the thread pool while the next
batch is generated. At the end the per-image judgements are all-gathered (every rank gets the same
report; rank 0 writes the files).

Deadline (``--eval_timeout``, 0 = none): local work stops by ``deadline - reserve`` (no new batch is generated,
no judge attempt starts, unanswered requests are abandoned and reported as failed), and the gather waits
behind a ``monitored_barrier`` (on a gloo group made for this evaluation) whose timeout ends at the deadline;
a rank that did not arrive is reported (``EvalReport.complete = False``, its images counted as missing; an image the
judge failed on also makes the evaluation incomplete)
instead of blocking the others. Under ZeRO-3 (``lockstep=True``: partitioned parameters, every forward is
collective) the ranks run the same padded batch plan and take every stop decision together (``sharding.py``);
a rank that raises inside a forward still leaves the others waiting until the process group's timeout.

Generation is a callable ``generate_fn(prompts, cfg_scale, num_inference_steps, seed) -> list[PIL.Image]`` so
the loop is testable without a model; :func:`model_generate_fn` builds it on the DeepGen model with the ODE
sampler of ``deepgen_rl.sampling.generate_images``. A batch's seed is ``seed + id of its first image``:
results repeat for the same world size and micro-batch size.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from PIL import Image

from deepgen_rl.eval.aggregate import ImageJudgement, aggregate_dataset, sort_judgements
from deepgen_rl.eval.dataset import EvalDataset, load_eval_datasets
from deepgen_rl.config import DataArguments, EvalArguments, GRPOConfig, JudgeArguments
from deepgen_rl.core.distributed import rank_and_world, seeded_generator
from deepgen_rl.eval.judge import UniGenBenchJudge, failed_judgement
from deepgen_rl.eval.report import SAMPLES_DIR, DatasetReport, EvalReport, metrics_for_logging, write_report
from deepgen_rl.eval.sharding import (GenerationBatch, Lockstep, WorkItem, agree, generation_batches, lockstep_batches,
                                      plan_work, rank_batches, shard_work)
from deepgen_rl.rewards.http_utils import RewardServerUnavailable
from deepgen_rl.rewards.reward_step import images_to_pil

logger = logging.getLogger(__name__)
__all__ = ["GenerateFn", "GenerationSettings", "WorkItem", "evaluate_model", "generation_batches", "make_eval_hook",
           "model_generate_fn", "plan_work", "run_evaluation", "shard_work"]

GenerateFn = Callable[[list[str], float, int, int], list[Image.Image]]
# Part of --eval_timeout kept for the final gather: min(this fraction, MAX_GATHER_RESERVE_S).
GATHER_RESERVE_FRACTION = 0.1
MAX_GATHER_RESERVE_S = 60.0
MIN_BARRIER_WAIT_S = 1.0  # a rank that reaches the gather just after the deadline still gets this long


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate the eval images (the training run's image size, seed and micro-batches); how much to
    evaluate and how long to take come from :class:`~deepgen_rl.config.EvalArguments`."""

    height: int
    width: int
    seed: int
    micro_batch_size: int
    decode_micro_batch_size: Optional[int] = None  # images per VAE decode (None: micro_batch_size)

    @classmethod
    def from_training_args(cls, args: GRPOConfig) -> "GenerationSettings":
        return cls(height=args.image_height, width=args.image_width, seed=args.seed,
                   micro_batch_size=args.rollout_micro_batch_size,
                   decode_micro_batch_size=args.vae_decode_micro_batch_size)


def run_evaluation(generate_fn: GenerateFn, judge_args: JudgeArguments, eval_args: EvalArguments,
                   datasets: Sequence[EvalDataset], settings: GenerationSettings, output_dir: Optional[str | Path],
                   step: int, lockstep: bool = False) -> EvalReport:
    """Evaluate this rank's share, gather every rank's judgements and aggregate; rank 0 writes the files.
    ``lockstep``: every rank runs the same number of generation forwards (needed under ZeRO-3)."""
    start = time.monotonic()
    timeout_s = eval_args.eval_timeout
    deadline = start + timeout_s if timeout_s > 0 else None
    work_deadline = None
    if deadline is not None:
        work_deadline = deadline - min(GATHER_RESERVE_FRACTION * timeout_s, MAX_GATHER_RESERVE_S)
    rank, world_size = rank_and_world()
    group = new_gather_group() if world_size > 1 else None  # now, while every rank is here
    plan = plan_work(datasets)
    sample_dir = Path(output_dir) / SAMPLES_DIR if output_dir is not None and rank == 0 else None
    try:
        if lockstep and group is not None:
            batches, steps = lockstep_batches(plan, rank, world_size, settings.micro_batch_size), Lockstep(group)
        else:
            batches, steps = rank_batches(plan, rank, world_size, settings.micro_batch_size), None
        local = _evaluate_shard(generate_fn, judge_args, datasets, batches, settings,
                                eval_args.eval_num_sample_images, work_deadline, sample_dir, steps)
        judgements, complete = gather_judgements(local, deadline, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    judgements = sort_judgements(judgements)
    reports = [DatasetReport(spec=d.spec, scores=aggregate_dataset(d.spec.name, judgements),
                             planned_images=len(d.prompts) * d.spec.duplicates) for d in datasets]
    # Complete = every planned image judged: a run whose judge was unreachable scored nothing and must not read
    # as a finished evaluation (eval/complete 1.0 over failed images, as it once did).
    every_image_judged = all(r.scores.failed_images == 0 and r.missing_images == 0 for r in reports)
    report = EvalReport(step=step, datasets=reports, elapsed_s=time.monotonic() - start, world_size=world_size,
                        complete=complete and every_image_judged, output_dir=None if output_dir is None else str(output_dir),
                        judgements=judgements)
    if rank == 0 and output_dir is not None:
        write_report(report, output_dir)
    return report


def _evaluate_shard(generate_fn: GenerateFn, judge_args: JudgeArguments, datasets: Sequence[EvalDataset],
                    batches: Sequence[GenerationBatch], settings: GenerationSettings, num_sample_images: int,
                    deadline: Optional[float], sample_dir: Optional[Path],
                    lockstep: Optional[Lockstep] = None) -> list[ImageJudgement]:
    """Generate and judge the items of ``batches``; every item comes back as a judgement (scored or failed with a
    reason). Padding batches are generated and dropped; with ``lockstep`` every skip is decided by all ranks."""
    def failed(item: WorkItem, error: str) -> ImageJudgement:
        spec = datasets[item.dataset].spec
        return failed_judgement(spec.name, item.prompt, item.duplicate, spec.language, error)

    items = [item for batch in batches if not batch.padding for item in batch.items]
    if not batches:
        return []
    with UniGenBenchJudge(judge_args) as judge:
        ready_error = _judge_ready_error(judge, judge_args, deadline) if items else None
        if not agree(lockstep, ready_error is None):
            ready_error = ready_error or "another rank could not reach the judge (ZeRO-3 evaluation runs in step)"
            logger.error("UniGenBench evaluation skipped on this rank (%d images not generated): %s", len(items),
                         ready_error)
            return [failed(item, f"judge unavailable: {ready_error}") for item in items]
        pending: list[tuple[WorkItem, Future]] = []
        results: list[ImageJudgement] = []
        saved: dict[int, int] = {}
        generation_error: Optional[str] = None
        for batch in batches:
            reason = None
            if generation_error is not None:
                reason = f"not generated: an earlier batch failed ({generation_error})"
            elif deadline is not None and time.monotonic() >= deadline:
                reason = "not generated: evaluation deadline (--eval_timeout) passed"
            if not agree(lockstep, reason is None):
                reason = reason or "not generated: another rank stopped (ZeRO-3 evaluation runs in step)"
            if reason is not None:
                results += [failed(item, reason) for item in batch.items if not batch.padding]
                continue
            spec = datasets[batch.dataset].spec
            try:
                images = generate_fn([item.prompt.prompt for item in batch.items], spec.cfg_scale,
                                     spec.num_inference_steps, settings.seed + batch.items[0].item_id)
                if len(images) != len(batch.items):
                    raise RuntimeError(f"generate_fn returned {len(images)} images for {len(batch.items)} prompts")
            except Exception as err:  # keep the trainer alive; the report says what happened
                logger.exception("UniGenBench generation failed on %s", spec.name)
                generation_error = f"{type(err).__name__}: {err}"
                results += [failed(item, f"generation failed: {generation_error}") for item in batch.items
                            if not batch.padding]
                continue
            if batch.padding:
                continue
            for item, image in zip(batch.items, images):
                if sample_dir is not None and saved.get(item.dataset, 0) < num_sample_images:
                    saved[item.dataset] = saved.get(item.dataset, 0) + 1
                    _save_sample(sample_dir / spec.name, item, image)
                pending.append((item, judge.submit(spec.name, item.prompt, item.duplicate, image, spec.language,
                                                   deadline)))
        results += _collect(pending, deadline, failed)
    return results


def _judge_ready_error(judge: UniGenBenchJudge, judge_args: JudgeArguments, deadline: Optional[float]
                       ) -> Optional[str]:
    """None when the judge answers its health check (bounded by the deadline), else why not."""
    health_wait = judge_args.judge_health_timeout
    if deadline is not None:
        health_wait = max(min(health_wait, deadline - time.monotonic()), MIN_BARRIER_WAIT_S)
    try:
        judge.check_ready(timeout_s=health_wait)
    except RewardServerUnavailable as err:
        return str(err)
    return None


def _collect(pending: Sequence[tuple[WorkItem, Future]], deadline: Optional[float],
             failed: Callable[[WorkItem, str], ImageJudgement]) -> list[ImageJudgement]:
    """Wait for the judge futures until the deadline; unanswered ones are reported as failed."""
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    wait([future for _, future in pending], timeout=timeout)
    results = []
    for item, future in pending:
        if not future.done():
            future.cancel()
            results.append(failed(item, "judge did not answer before the evaluation deadline (--eval_timeout)"))
        elif future.cancelled():
            results.append(failed(item, "judge request was cancelled"))
        elif future.exception() is not None:
            results.append(failed(item, f"judge request crashed: {future.exception()!r}"))
        else:
            results.append(future.result())
    return results


def _save_sample(folder: Path, item: WorkItem, image: Image.Image) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{item.prompt.index}_{item.duplicate}.png")


def new_gather_group():
    """A fresh gloo group of all ranks for one evaluation's monitored_barrier (gloo only) and object gather.

    Fresh each time because a barrier that timed out leaves a late rank's message in flight on its group; the
    next evaluation must not read it. Every rank must call this at the same point (the start of an evaluation).
    """
    return dist.new_group(backend="gloo")


def gather_judgements(local: Sequence[ImageJudgement], deadline: Optional[float],
                      group=None) -> tuple[list[ImageJudgement], bool]:
    """Every rank's judgements on every rank; (this rank's only, False) if some rank misses the deadline.
    ``group``: a gloo group of all ranks (None: the default group, which must then be gloo)."""
    rank, world_size = rank_and_world()
    if world_size == 1:
        return list(local), True
    if deadline is not None:
        wait_s = max(deadline - time.monotonic(), MIN_BARRIER_WAIT_S)
        try:
            dist.monitored_barrier(group=group, timeout=timedelta(seconds=wait_s), wait_all_ranks=True)
        except RuntimeError as err:
            logger.error("UniGenBench evaluation: not every rank finished by --eval_timeout; rank %d reports its own "
                         "%d images only. %s", rank, len(local), err)
            return list(local), False
    gathered: list[Optional[list[ImageJudgement]]] = [None] * world_size
    dist.all_gather_object(gathered, list(local), group=group)
    return [judgement for part in gathered for judgement in (part or [])], True


# ---- the model-backed generate_fn and the trainer hook ----

def model_generate_fn(model, height: int, width: int, micro_batch_size: Optional[int] = None,
                      decode_micro_batch_size: Optional[int] = None) -> GenerateFn:
    """generate_fn on a DeepGen model: ODE (Euler) sampling with CFG against the empty prompt in the generation
    template, encoded in the prompts' own batch (sampling/rollout.py ``encode_conditioning``), one image per prompt,
    initial noise from a CPU generator seeded with ``seed``."""
    from deepgen_rl.sampling import generate_images

    def generate(prompts: list[str], cfg_scale: float, num_inference_steps: int, seed: int) -> list[Image.Image]:
        generator = seeded_generator(torch.device("cpu"), seed)
        images = generate_images(model, prompts, num_inference_steps=num_inference_steps, height=height, width=width,
                                 cfg_scale=cfg_scale, generator=generator, micro_batch_size=micro_batch_size,
                                 decode_micro_batch_size=decode_micro_batch_size)
        return images_to_pil(images)

    return generate


def evaluate_model(model, training_args: GRPOConfig, judge_args: JudgeArguments, eval_args: EvalArguments, step: int,
                   datasets: Sequence[EvalDataset], output_dir: Optional[str | Path] = None,
                   lockstep: bool = False) -> EvalReport:
    """Evaluate ``model`` now (every rank calls it), with the settings of the training flags; ``lockstep`` under
    ZeRO-3 (see :func:`run_evaluation`)."""
    settings = GenerationSettings.from_training_args(training_args)
    folder = Path(output_dir) if output_dir is not None else Path(training_args.output_dir) / "eval" / f"step_{step}"
    generate_fn = model_generate_fn(model, settings.height, settings.width, settings.micro_batch_size,
                                    settings.decode_micro_batch_size)
    was_training = model.training
    model.eval()
    try:
        return run_evaluation(generate_fn, judge_args, eval_args, datasets, settings, folder, step, lockstep)
    finally:
        model.train(was_training)


def make_eval_hook(training_args: GRPOConfig, data_args: DataArguments, judge_args: JudgeArguments,
                   eval_args: EvalArguments, lockstep: bool = False, edit_judge=None
                   ) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """``hook(model, step) -> metrics`` for a trainer that decides itself when to evaluate (every rank calls it).

    The eval YAML and CSVs are read here, once, so a bad eval config fails at start-up rather than at the
    first evaluation hours later. ``edit_judge``: scores the YAML's ``scoring: edit_judge`` sets (edit_eval.py),
    whose metrics join UniGenBench's."""
    from deepgen_rl.eval.edit_eval import evaluate_edits_now, load_edit_eval_sets

    datasets = load_eval_datasets(data_args.eval_dataset_config, eval_args.eval_max_prompts)
    edit_sets = load_edit_eval_sets(data_args.eval_dataset_config, eval_args.eval_max_prompts)
    if edit_sets and edit_judge is None:
        raise ValueError(f"{data_args.eval_dataset_config}: edit eval sets need the edit judge (--edit_judge_url).")

    def hook(model: torch.nn.Module, step: int) -> dict[str, float]:
        metrics = (metrics_for_logging(evaluate_model(model, training_args, judge_args, eval_args, step, datasets,
                                                      lockstep=lockstep)) if datasets else {})
        if edit_sets:
            metrics.update(evaluate_edits_now(model, training_args, edit_judge, edit_sets, step))
        return metrics

    return hook
