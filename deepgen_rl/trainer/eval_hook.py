"""The periodic UniGenBench evaluation hook of the trainer (deepgen_rl/eval/ does the work).

Built once at start-up. Evaluation runs only when every rank can take part: the eval dataset config exists, the
judge answers its health check on every rank (the decision is all-reduced, so no rank waits in a collective the
others skipped) and the parameters are not ZeRO-3-partitioned (the eval runner's uneven per-rank work would
deadlock partitioned forwards). Otherwise one clear warning says why and training goes on without it; the
runner itself bounds each evaluation by --eval_timeout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from deepgen_rl.config import DataArguments, EvalArguments, GRPOConfig, JudgeArguments

from ..distributed import all_reduce_flag, is_distributed, rank_and_world
from .deepspeed_setup import load_deepspeed_config, zero_stage

logger = logging.getLogger(__name__)

EvalHook = Callable[[torch.nn.Module, int], Mapping[str, float]]


def _all_ranks_agree(ok: bool) -> bool:
    if not is_distributed():
        return ok
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return all_reduce_flag(ok, "cpu" if accelerator.device_name() == "cpu" else accelerator.current_device_name(), "min")


def _unavailable_reason(args: GRPOConfig, data_args: DataArguments, judge_args: JudgeArguments) -> Optional[str]:
    config = Path(data_args.eval_dataset_config)
    if not config.is_file():
        return f"the eval dataset config {config} (--eval_dataset_config / EVAL_DATASET_CONFIG) does not exist"
    if zero_stage(load_deepspeed_config(args.deepspeed)) >= 3:
        return "ZeRO-3 partitions the weights and the evaluation's uneven per-rank work would deadlock"
    from deepgen_rl.eval import UniGenBenchJudge
    from deepgen_rl.rewards.http_utils import RewardServerUnavailable

    judge = UniGenBenchJudge(judge_args)
    try:
        judge.check_ready()
    except RewardServerUnavailable as err:
        return f"the UniGenBench judge is not reachable ({err})"
    finally:
        judge.close()
    return None


def build_eval_hook(args: GRPOConfig, data_args: DataArguments, judge_args: JudgeArguments,
                    eval_args: EvalArguments) -> Optional[EvalHook]:
    """``hook(model, step) -> metrics`` (every rank calls it), or None with one warning when evaluation cannot
    run; None without a word when --eval_freq is 0."""
    if not args.eval_freq:
        return None
    reason = _unavailable_reason(args, data_args, judge_args)
    if not _all_ranks_agree(reason is None):
        rank, _ = rank_and_world()
        if rank == 0:
            logger.warning("periodic evaluation (--eval_freq %d) is OFF for this run: %s. Start the judge with "
                           "`bash scripts/eval_unigenbench_evalmodel.sh` or pass --eval_freq 0.", args.eval_freq,
                           reason or "another rank could not reach the judge")
        return None
    from deepgen_rl.eval import make_eval_hook

    return make_eval_hook(args, data_args, judge_args, eval_args)
