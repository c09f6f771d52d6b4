"""The periodic UniGenBench evaluation hook of the trainer (deepgen_rl/eval/ does the work).

Built once at start-up. Evaluation runs only when every rank can take part: the eval dataset config exists and the
judge answers its health check on every rank (the decision is all-reduced, so no rank waits in a collective the
others skipped). Otherwise one clear warning says why and training goes on without it; the runner itself bounds
each evaluation by --eval_timeout. Under ZeRO-3 (partitioned parameters) the runner keeps the ranks' generation
forwards in step (``eval/sharding.py``).

``--vllm_sleep_switching``: the judge is put to sleep at start-up, and each evaluation runs between
``to_judge`` and ``to_reward`` (``eval/switching.py``); rank 0 switches, the others wait for its outcome.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch

from deepgen_rl.config import DataArguments, EvalArguments, GRPOConfig, JudgeArguments

from ..core.distributed import all_reduce_flag, is_distributed, rank_and_world
from .deepspeed_setup import load_deepspeed_config, zero_stage

if TYPE_CHECKING:
    from deepgen_rl.eval.edit_eval import EvalEditJudge

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


class PeriodicEval:
    """The trainer's eval hook, ``hook(model, step) -> metrics``, with the clients built for evaluation alone (an
    eval-only edit judge): ``close()`` releases them with the trainer."""

    def __init__(self, hook: EvalHook, owned_clients: Sequence = ()) -> None:
        self.hook, self.owned_clients = hook, list(owned_clients)

    def __call__(self, model: torch.nn.Module, step: int) -> Mapping[str, float]:
        return self.hook(model, step)

    def close(self) -> None:
        for client in self.owned_clients:
            client.close()
        self.owned_clients = []


def build_eval_hook(args: GRPOConfig, data_args: DataArguments, judge_args: JudgeArguments,
                    eval_args: EvalArguments, vllm_reward_urls: Sequence[str] = (),
                    edit_judge: Callable[[], Optional["EvalEditJudge"]] = lambda: None) -> Optional[PeriodicEval]:
    """``hook(model, step) -> metrics`` (every rank calls it), or None with one warning when evaluation cannot
    run; None without a word when --eval_freq is 0. ``vllm_reward_urls``: the vLLM reward servers of this run
    (what --vllm_sleep_switching puts to sleep around evaluation); ``edit_judge``: builds the judge of the eval
    YAML's edit sets, called only once evaluation is on (an eval-only client is never built for a run that does not
    evaluate; the returned hook's ``close`` closes it)."""
    rank, _ = rank_and_world()
    if not args.eval_freq:
        if eval_args.vllm_sleep_switching and rank == 0:
            logger.warning("--vllm_sleep_switching does nothing with --eval_freq 0: there is no evaluation.")
        return None
    reason = _unavailable_reason(args, data_args, judge_args)
    if not _all_ranks_agree(reason is None):
        if rank == 0:
            logger.warning("periodic evaluation (--eval_freq %d) is OFF for this run: %s. Start the judge with "
                           "`bash scripts/eval_unigenbench_evalmodel.sh` or pass --eval_freq 0.", args.eval_freq,
                           reason or "another rank could not reach the judge")
        return None
    from deepgen_rl.eval import make_eval_hook

    lockstep = zero_stage(load_deepspeed_config(args.deepspeed)) >= 3
    edit = edit_judge()
    owned = [edit.client] if edit is not None and edit.owned else []
    try:
        hook = make_eval_hook(args, data_args, judge_args, eval_args, lockstep=lockstep,
                              edit_judge=None if edit is None else edit.client)
        return PeriodicEval(_with_switching(hook, eval_args, vllm_reward_urls, judge_args, rank), owned)
    except BaseException:
        for client in owned:
            client.close()
        raise


def _with_switching(hook: EvalHook, eval_args: EvalArguments, vllm_reward_urls: Sequence[str],
                    judge_args: JudgeArguments, rank: int) -> EvalHook:
    """``hook`` as is, or with --vllm_sleep_switching between the judge and the reward servers around it."""
    if not eval_args.vllm_sleep_switching:
        return hook
    from deepgen_rl.eval.switching import VllmSleepSwitch

    switch = VllmSleepSwitch(vllm_reward_urls, judge_args.unigenbench_api_url, eval_args.vllm_switch_timeout)
    if rank == 0:
        logger.info("--vllm_sleep_switching: reward server(s) %s <-> judge %s around each evaluation",
                    ", ".join(switch.reward_urls) or "(none: this run has no vLLM reward)", switch.judge_url)
    switch_on_rank0(switch.to_reward)  # the judge sleeps while training; a server that cannot switch stops here
    return switched_hook(hook, switch)


def switched_hook(hook: EvalHook, switch) -> EvalHook:
    """``hook`` between ``switch.to_judge()`` and ``switch.to_reward()`` (the latter also after a failure)."""
    def run(model: torch.nn.Module, step: int) -> Mapping[str, float]:
        try:
            switch_on_rank0(switch.to_judge)
            return hook(model, step)
        finally:
            switch_on_rank0(switch.to_reward)

    return run


def switch_on_rank0(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 only (one switch per server); every rank raises VllmSwitchError if it failed."""
    from deepgen_rl.eval.switching import VllmSwitchError

    rank, world_size = rank_and_world()
    message = [""]
    if rank == 0:
        try:
            action()
        except VllmSwitchError as err:
            logger.error("vLLM sleep switching failed: %s", err)
            message = [str(err)]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise VllmSwitchError(message[0])
