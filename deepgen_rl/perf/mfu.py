"""MFU in the logs: a run's FLOPs per phase, counted once at start-up, over the phase timers' seconds.

At start-up the trainer takes a ``meta`` copy of its model (flop_units.py: shapes only, no memory, before
DeepSpeed partitions the weights); at the first step it counts the FLOP units on it at the run's shapes and that
step's text length (seconds on a CPU), and the step's FLOPs per phase timer (step_flops.py). Every step then logs,
per timed phase (rollout, decode, train) and for the whole step:

    perf/<phase>_tflops = FLOPs of the phase / time/<phase> / 1e12      (per GPU)
    perf/<phase>_mfu    = perf/<phase>_tflops / --gpu_peak_tflops        (omitted when the peak is unknown)
    perf/images_per_s_per_gpu = N / time/step

The rollout phase holds the prompt encoding (and the VAE decode under --stream_rewards, as its timer does); the
train phase the policy chunks, reference and KL forwards, SFT-aux and the EMA. A step whose update was skipped
(no reward on any rank) logs no train figures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from .flop_units import measure_units, meta_copy
from .step_flops import flops_by_timer, phase_flops, step_counts

logger = logging.getLogger(__name__)
PROMPT_TOKENS = 64  # chat-formatted prompt length assumed (the estimator's --prompt_tokens default)


@dataclass(frozen=True)
class StepPerf:
    """flops: FLOPs per PhaseTimer phase of one rank's GRPO step; peak_tflops: None when unknown (no MFU)."""

    flops: dict[str, int]
    images_per_rank: int
    peak_tflops: Optional[float]

    @classmethod
    def count(cls, meta_model, args, plan, *, text_trains: bool, sftaux: bool, prompt_tokens: int,
              peak_tflops: Optional[float], zero_stage: int = 0) -> "StepPerf":
        """Count on ``meta_model`` (a meta copy made before DeepSpeed partitions the live one)."""
        units = measure_units(meta_model, height=args.image_height, width=args.image_width,
                              prompt_tokens=prompt_tokens, gradient_checkpointing=args.gradient_checkpointing)
        counts = step_counts(args, plan, text_trains=text_trains, sftaux=sftaux, zero_stage=zero_stage)
        by_timer = flops_by_timer(phase_flops(units, counts), counts.stream_rewards)
        return cls(flops={k: v for k, v in by_timer.items() if v}, images_per_rank=plan.samples_per_rank,
                   peak_tflops=peak_tflops)

    def metrics(self, step_metrics: dict[str, float]) -> dict[str, float]:
        """perf/ metrics of one step from its time/<phase> seconds (and train/skipped)."""
        trained = not step_metrics.get("train/skipped", 0.0)
        flops = {phase: value for phase, value in self.flops.items() if trained or phase != "train"}
        out: dict[str, float] = {}

        def rate(name: str, value: float, seconds: Optional[float]) -> None:
            if not seconds or seconds <= 0:
                return
            tflops = value / seconds / 1e12
            out[f"perf/{name}_tflops"] = tflops
            if self.peak_tflops:
                out[f"perf/{name}_mfu"] = tflops / self.peak_tflops

        for phase, value in flops.items():
            rate(phase, value, step_metrics.get(f"time/{phase}"))
        step_seconds = step_metrics.get("time/step")
        rate("step", sum(flops.values()), step_seconds)
        if step_seconds and step_seconds > 0:
            out["perf/images_per_s_per_gpu"] = self.images_per_rank / step_seconds
        return out


class StepPerfCounter:
    """The trainer's side: a meta copy of the model taken at start-up (before DeepSpeed partitions it), counted at
    the first step with that step's text length (prompt + meta queries, as the rollout's conditioning has it), then
    reused. Any failure turns the perf/ metrics off with a warning: a metric never stops training."""

    def __init__(self, meta_model, args, plan, *, text_trains: bool, sftaux: bool, rank: int) -> None:
        self._meta_model, self._args, self._plan = meta_model, args, plan
        self._text_trains, self._sftaux, self._rank = text_trains, sftaux, rank
        self.perf: Optional[StepPerf] = None
        self.zero_stage = 0  # set by the trainer once its engine exists (ZeRO-3 runs --kl_forward separate)

    @classmethod
    def prepare(cls, model, args, plan, *, text_trains: bool, sftaux: bool, rank: int) -> Optional["StepPerfCounter"]:
        try:
            meta_model = meta_copy(model)
        except Exception as err:  # noqa: BLE001 - any failure only costs the perf/ metrics
            _warn_off(err)
            return None
        return cls(meta_model, args, plan, text_trains=text_trains, sftaux=sftaux, rank=rank)

    def metrics(self, step_metrics: dict[str, float], text_tokens: Optional[int]) -> dict[str, float]:
        """perf/ metrics of a step; ``text_tokens``: its conditioning's length (None: PROMPT_TOKENS + queries)."""
        if self.perf is None and self._meta_model is not None:
            model, self._meta_model = self._meta_model, None  # counted once; the copy is dropped either way
            prompt_tokens = PROMPT_TOKENS if text_tokens is None else max(text_tokens - model.num_queries, 1)
            from .peak import default_peak_tflops

            started = time.perf_counter()
            try:
                self.perf = StepPerf.count(model, self._args, self._plan, text_trains=self._text_trains,
                                           sftaux=self._sftaux, prompt_tokens=prompt_tokens,
                                           zero_stage=self.zero_stage,
                                           peak_tflops=default_peak_tflops(getattr(self._args, "gpu_peak_tflops",
                                                                                   None)))
            except Exception as err:  # noqa: BLE001
                _warn_off(err)
                return {}
            if self._rank == 0:
                peak = (f"MFU against {self.perf.peak_tflops:g} TFLOP/s" if self.perf.peak_tflops
                        else "no MFU: unknown GPU peak (set --gpu_peak_tflops)")
                logger.info("FLOPs per GRPO step and rank at %d prompt tokens: %s (counted in %.1f s; %s)",
                            prompt_tokens, ", ".join(f"{k} {v / 1e12:.4g} TFLOP" for k, v in self.perf.flops.items()),
                            time.perf_counter() - started, peak)
        return {} if self.perf is None else self.perf.metrics(step_metrics)


def conditioning_tokens(batch) -> Optional[int]:
    """Text tokens of a rollout batch's conditioning [N, L, D] (None for a mixed edit / t2i batch)."""
    embeds = getattr(getattr(batch.trajectory, "conditioning", None), "prompt_embeds", None)
    return None if embeds is None else int(embeds.shape[1])


def _warn_off(err: Exception) -> None:
    logger.warning("could not count the step's FLOPs on a meta copy of the model (%s: %s): perf/ metrics are off "
                   "for this run.", type(err).__name__, err)
