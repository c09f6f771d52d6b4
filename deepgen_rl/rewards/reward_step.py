"""The reward phase of a GRPO step: score a batch with every reward its datasets use, concurrently.

Legend: N = B*G samples (B prompts x G images), K = number of reward columns (fixed for a run: the rewards
the dataset YAML mentions, in first-seen order).

Each sample carries its dataset's reward weights (``{name: weight}``); a reward is computed only for the
samples whose dataset uses it (weight > 0), all rewards at the same time (one thread per reward; HTTP
rewards are concurrent inside). A reward that fails on a sample leaves NaN in ``scores`` and marks the
sample ``failed``: the advantage step excludes it from its group and the failure is counted in the logs.
Nothing is ever filled in with 0 or 0.5.

A value outside the reward's declared ``score_range`` is a failure too (a broken server's 1e30 is not a score), and
so is a sample whose image holds NaN/inf (a diverged rollout's latents decode to NaN, which would otherwise be
clamped to a black image and scored): it is sent to no reward, fails every reward it uses, and is counted in
``metrics["nonfinite_images"]``.
``deadline_s`` (--reward_step_deadline) bounds the whole phase: a reward still running then fails its samples,
its call is abandoned (a daemon thread, so it cannot hold the process open) and, while it still runs, later
steps fail that reward's samples at once instead of queueing behind it. The trainer's failure budget decides
when failures mean the run must stop.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from PIL import Image

from deepgen_rl.rewards.base import RewardFunction, RewardScores

logger = logging.getLogger(__name__)

ImageBatch = Union[Sequence[Image.Image], torch.Tensor]
Sources = Sequence[Sequence[Image.Image]]  # per sample its source images (editing)
Targets = Sequence[Optional[str]]  # per sample an edit's target_text (None: the prompt's quoted spans)
# A score within this (relative) distance of its range's bound is float rounding (a cosine of 1 + 1 ulp), not a
# broken server.
RANGE_SLACK = 1e-6


def out_of_range(value: float, score_range: tuple[float, float]) -> bool:
    low, high = score_range
    return value < low - RANGE_SLACK * max(1.0, abs(low)) or value > high + RANGE_SLACK * max(1.0, abs(high))


@dataclass(frozen=True)
class RewardFailure:
    sample: int
    reward: str
    message: str


@dataclass
class RewardBatch:
    """Rewards of one batch.

    names:    K reward names (column order of the tensors)
    scores:   [N, K] float32; NaN where the reward failed or the sample's dataset does not use it
    weights:  [N, K] float32; the sample's dataset weight for each reward (0 = unused)
    valid:    [N, K] bool; the reward was computed for the sample
    failed:   [N] bool; a reward the sample uses (weight > 0) failed -> exclude the sample
    failure_counts: per reward, how many samples it failed on
    failures: every failure with its reason (for logs)
    metrics:  scalars per reward (e.g. ``unifiedreward_think/answer_parse_rate``) and timings
    """

    names: tuple[str, ...]
    scores: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    failed: torch.Tensor
    failure_counts: dict[str, int]
    failures: list[RewardFailure] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


NONFINITE_IMAGE = "its image holds NaN/inf (the rollout or the VAE decode diverged); not scored"


def nonfinite_rows(images: ImageBatch) -> list[int]:
    """The rows of ``images`` [N, 3, H, W] with a NaN/inf pixel ([] for PIL images, which cannot hold one)."""
    if not isinstance(images, torch.Tensor):
        return []
    return torch.nonzero(~torch.isfinite(images.detach()).flatten(1).all(dim=1)).flatten().tolist()


def images_to_pil(images: ImageBatch) -> list[Image.Image]:
    """[N, 3, H, W] float in [0, 1] (as the VAE decodes) -> N RGB PIL images; PIL lists pass through."""
    if not isinstance(images, torch.Tensor):
        return list(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W]; got shape {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(frame) for frame in array]


class RewardStep:
    """Scores batches with a fixed set of reward functions (built once by ``registry.build_rewards``).

    ``deadline_s``: seconds the whole reward phase of one batch may take (None: no limit).
    """

    def __init__(self, rewards: Mapping[str, RewardFunction], names: Optional[Sequence[str]] = None,
                 deadline_s: Optional[float] = None) -> None:
        self.names: tuple[str, ...] = tuple(names if names is not None else rewards)
        missing = [name for name in self.names if name not in rewards]
        if missing:
            raise ValueError(f"no reward function built for {missing}; built: {sorted(rewards)}")
        for name in self.names:
            _check_declarations(name, rewards[name])
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"--reward_step_deadline must be > 0 seconds (or unset); got {deadline_s}.")
        self.rewards = dict(rewards)
        self.deadline_s = deadline_s
        self._in_flight: dict[str, Future] = {}  # each reward's last call, possibly abandoned at the deadline
        # One thread lets submit() overlap the next rollout; each reward call gets its own daemon thread.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-step")

    def submit(self, images: ImageBatch, prompts: Sequence[str], reward_weights: Sequence[Mapping[str, float]],
               group_ids: Sequence[int], sources: Optional[Sources] = None,
               targets: Optional[Targets] = None) -> "Future[RewardBatch]":
        """Start scoring in the background (e.g. while the next rollout runs); ``.result()`` gives the batch."""
        pil_images = images_to_pil(images)  # convert now: the caller may reuse its tensor
        return self._background.submit(self.score, pil_images, prompts, reward_weights, group_ids, sources, targets,
                                       nonfinite_rows(images))

    def score(self, images: ImageBatch, prompts: Sequence[str], reward_weights: Sequence[Mapping[str, float]],
              group_ids: Sequence[int], sources: Optional[Sources] = None,
              targets: Optional[Targets] = None, nonfinite: Optional[Sequence[int]] = None) -> RewardBatch:
        """``sources``: per sample its source images (edit rows; [] for text-to-image), given to the rewards that
        declare ``needs_sources``; ``targets``: per sample an edit's target_text or None, given to the rewards
        that declare ``needs_targets`` (ocr); both None when no sample is an edit. ``nonfinite``: rows whose image
        held NaN/inf before it became a PIL image (``submit``); found here for a tensor."""
        broken = set(nonfinite_rows(images) if nonfinite is None else nonfinite)
        pil_images = images_to_pil(images)
        n = len(pil_images)
        if not (len(prompts) == len(reward_weights) == len(group_ids) == n):
            raise ValueError(f"reward step inputs differ in length: {n} images, {len(prompts)} prompts, "
                             f"{len(reward_weights)} reward weights, {len(group_ids)} group ids.")
        if sources is not None and len(sources) != n or targets is not None and len(targets) != n:
            raise ValueError(f"reward step got {len(sources or [])} rows of sources / {len(targets or [])} target "
                             f"texts for {n} images.")
        weights = self._weight_matrix(reward_weights)  # [N, K]
        started = time.perf_counter()
        jobs: dict[str, tuple[list[int], Future]] = {}
        busy: dict[str, list[int]] = {}
        for k, name in enumerate(self.names):
            rows = [row for row in torch.nonzero(weights[:, k] > 0).flatten().tolist() if row not in broken]
            if not rows:
                continue
            if name in self._in_flight and not self._in_flight[name].done():
                busy[name] = rows
                continue
            extra = self._edit_inputs(self.rewards[name], rows, sources, targets)
            jobs[name] = (rows, self._start(name, [pil_images[i] for i in rows], [prompts[i] for i in rows],
                                            [group_ids[i] for i in rows], extra))
        results = {name: (rows, self._wait(name, future, len(rows), started)) for name, (rows, future) in jobs.items()}
        for name, rows in busy.items():
            results[name] = (rows, RewardScores.all_failed(
                len(rows), f"reward {name} is still busy with a call that overran --reward_step_deadline "
                           f"({self.deadline_s:g} s); not called this step"))
        batch = self._assemble(n, weights, results, sorted(broken))
        batch.metrics["seconds"] = time.perf_counter() - started
        return batch

    @staticmethod
    def _edit_inputs(reward: RewardFunction, rows: list[int], sources: Optional[Sources],
                     targets: Optional[Targets]) -> dict:
        """The keyword arguments a reward declares it takes (``needs_sources`` / ``needs_targets``), for ``rows``.
        A reward that needs sources gets them even when None (it then fails its rows, naming the cause)."""
        extra = {}
        if getattr(reward, "needs_sources", False):
            extra["sources"] = None if sources is None else [sources[i] for i in rows]
        if getattr(reward, "needs_targets", False) and targets is not None:
            extra["targets"] = [targets[i] for i in rows]
        return extra

    def _start(self, name: str, images: list[Image.Image], prompts: list[str], group_ids: list[int],
               extra: Optional[dict] = None) -> Future:
        """Run one reward on a daemon thread: a call abandoned at the deadline cannot keep the process alive."""
        future: Future = Future()

        def run() -> None:
            future.set_result(self._run_reward(name, images, prompts, group_ids, extra))  # never raises

        self._in_flight[name] = future
        threading.Thread(target=run, name=f"reward-{name}", daemon=True).start()
        return future

    def _wait(self, name: str, future: Future, num_rows: int, started: float) -> RewardScores:
        timeout = None if self.deadline_s is None else max(0.0, started + self.deadline_s - time.perf_counter())
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            logger.warning("reward %s did not finish within --reward_step_deadline %g s: its %d samples fail this "
                           "step", name, self.deadline_s, num_rows)
            scores = RewardScores.all_failed(num_rows, f"reward {name} did not finish within --reward_step_deadline "
                                                       f"({self.deadline_s:g} s): its server is slow or hung")
            scores.metrics["deadline_exceeded"] = 1.0
            return scores

    def recheck(self, name: str) -> Optional[str]:
        """Ask reward ``name`` whether it works now (its server's /health): None if so, else the reason, which
        names the URL and how to start the server."""
        try:
            self.rewards[name].check_ready()
        except Exception as err:  # any failure to answer means "not ready"; the message is the point
            return str(err) or type(err).__name__
        return None

    def _weight_matrix(self, reward_weights: Sequence[Mapping[str, float]]) -> torch.Tensor:
        weights = torch.zeros(len(reward_weights), len(self.names), dtype=torch.float32)
        for i, sample_weights in enumerate(reward_weights):
            for name, weight in sample_weights.items():
                if name not in self.names:
                    raise ValueError(f"sample {i} uses reward {name!r}, which this reward step was not built with "
                                     f"({', '.join(self.names)}).")
                weights[i, self.names.index(name)] = float(weight)
        return weights

    def _run_reward(self, name: str, images: list[Image.Image], prompts: list[str],
                    group_ids: list[int], extra: Optional[dict] = None) -> RewardScores:
        started = time.perf_counter()
        try:
            scores = self.rewards[name].score(images, prompts, group_ids, **(extra or {}))
        except Exception as err:  # a crashing reward fails its samples loudly; the others still count
            logger.exception("reward %s raised on a batch of %d samples", name, len(images))
            scores = RewardScores.all_failed(len(images), f"reward {name} raised {type(err).__name__}: {err}")
        if len(scores.values) != len(images):
            scores = RewardScores.all_failed(len(images), f"reward {name} returned {len(scores.values)} values "
                                                          f"for {len(images)} images")
        scores.metrics["seconds"] = time.perf_counter() - started
        return scores

    def _assemble(self, n: int, weights: torch.Tensor, results: Mapping[str, tuple[list[int], RewardScores]],
                  broken: Sequence[int] = ()) -> RewardBatch:
        scores = torch.full((n, len(self.names)), math.nan, dtype=torch.float32)
        failures = [RewardFailure(row, name, f"sample {row}: {NONFINITE_IMAGE}")
                    for row in broken for k, name in enumerate(self.names) if weights[row, k] > 0]
        metrics: dict[str, float] = {"nonfinite_images": float(len(broken))}
        for k, name in enumerate(self.names):
            if name not in results:
                continue
            rows, reward_scores = results[name]
            score_range = self.rewards[name].score_range
            for row, value, error in zip(rows, reward_scores.values, reward_scores.errors):
                if value is None or not math.isfinite(value):
                    failures.append(RewardFailure(row, name, error or f"non-finite value {value!r}"))
                elif out_of_range(value, score_range):
                    failures.append(RewardFailure(row, name, f"{name} returned {value!r}, outside its declared "
                                                             f"range [{score_range[0]:g}, {score_range[1]:g}]"))
                else:
                    scores[row, k] = float(value)
            metrics.update({f"{name}/{key}": value for key, value in reward_scores.metrics.items()})
        valid = ~torch.isnan(scores)
        failed = ((weights > 0) & ~valid).any(dim=1)
        counts = {name: sum(f.reward == name for f in failures) for name in self.names}
        for failure in failures[:5]:
            logger.warning("reward %s failed on sample %d: %s", failure.reward, failure.sample, failure.message)
        if len(failures) > 5:
            logger.warning("... %d more reward failures this batch (counts: %s)", len(failures) - 5, counts)
        return RewardBatch(self.names, scores, weights, valid, failed, counts, failures, metrics)

    def close(self) -> None:
        self._background.shutdown(wait=True)
        for reward in self.rewards.values():
            reward.close()


def _check_declarations(name: str, reward: RewardFunction) -> None:
    """Every reward declares its score range and where it runs (see ``RewardFunction``)."""
    score_range = getattr(reward, "score_range", None)
    if not (isinstance(score_range, tuple) and len(score_range) == 2 and score_range[0] < score_range[1]):
        raise TypeError(f"reward {name!r} ({type(reward).__name__}) must declare score_range = (low, high), "
                        f"low < high; got {score_range!r}.")
    if not isinstance(getattr(reward, "service", None), str):
        raise TypeError(f"reward {name!r} ({type(reward).__name__}) must declare service: a str saying where it "
                        "runs and how to start it.")
