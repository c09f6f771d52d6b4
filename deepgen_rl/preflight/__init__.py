"""Check, before launching, everything a training run needs from outside the code.

``scripts/train.sh`` runs ``python -m deepgen_rl.preflight <the same flags>`` before ``torchrun``: a wrong model
path, a missing prompt file or a reward server that is down is reported in seconds, every problem at once,
each naming the variable or URL and how to fix it, instead of failing after every rank has loaded the model.

First every check that needs only flags and files, reported at once without waiting for anything: the model
folders and CHECKPOINT (by the loader's own checks, then a weights-only open; a real-size model without CHECKPOINT,
``launch_checks``), the batch over the world size (``--world_size``, given by train.sh), the dataset YAML and its
prompt files (their contents too: ``content.py``), the CLIP folder when a dataset uses ``clip_sim``, the eval
CSVs and the SFT-aux data; our shipped example data under a real model get a banner, and the run length is printed.
Only then the servers (the reward servers the YAML's rewards need, the UniGenBench judge when periodic evaluation is
on), awaited together for up to ``--server_wait`` seconds in all, with a progress line: a vLLM server still
loading a 32B model is waited for, a wrong model path is named at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ..config import (CLIP_ENV, DataArguments, GRPOConfig, JudgeArguments, ModelArguments, RewardArguments,
                     parse_args_or_exit)
from ..data.dataset_yaml import DatasetConfigError, load_dataset_config
from .launch_checks import (RunLength, batch_problem, deepspeed_problem, is_real_size_model, run_length,
                            sftaux_idle_ranks_warning, shipped_data_lines, shipped_data_warning,
                            untrained_connector_problem)
from ..model.loading import ModelPathError, check_checkpoint_path, check_qwen_path, check_sd3_path
from .content import check_checkpoint_loads, check_eval_contents, check_prompt_contents
from ..rewards.http_utils import RewardServerUnavailable
from ..rewards.registry import build_rewards, known_reward_names

SERVER_REWARDS = ("ocr", "unifiedreward_think", "pickscore", "hpsv2", "image_reward", "aesthetic", "edit_vlm_judge")
CLIP_REWARDS = ("clip_sim", "image_similarity")


def _problem(check: Callable[[], object], *errors: type[BaseException]) -> Optional[str]:
    try:
        check()
    except errors as err:
        return str(err)
    return None


def check_model_paths(model_args: ModelArguments) -> list[str]:
    checks = [lambda: check_sd3_path(model_args.sd3_model_name_or_path),
              lambda: check_qwen_path(model_args.qwen2_5_vl_model_name_or_path)]
    if model_args.checkpoint:
        checks.append(lambda: check_checkpoint_path(model_args.checkpoint))
    problems = [p for p in (_problem(c, ModelPathError) for c in checks) if p]
    if model_args.checkpoint and Path(model_args.checkpoint).expanduser().is_file():
        problems += [p for p in [check_checkpoint_loads(str(Path(model_args.checkpoint).expanduser()))] if p]
    return problems


def check_clip_path(path: str) -> Optional[str]:
    if not path:
        return (f"the dataset YAML uses a CLIP reward ({' / '.join(CLIP_REWARDS)}) but {CLIP_ENV} is not set: export "
                f"{CLIP_ENV}=/path/to/clip-vit-large-patch14 (or pass --clip_model_name_or_path).")
    if not (Path(path).expanduser() / "config.json").is_file():
        return (f"{CLIP_ENV} (--clip_model_name_or_path) = {path!r} is not a transformers CLIP folder "
                "(no config.json): expected e.g. clip-vit-large-patch14 on local disk.")
    return None


# A server check: (what is awaited, e.g. the URL, for the progress line; a call waiting up to its argument in seconds
# that returns a problem or None).
ServerCheck = tuple[str, Callable[[float], Optional[str]]]
PROGRESS_EVERY_S = 15.0


def reward_server_checks(reward_names: set[str], reward_args: RewardArguments) -> list[ServerCheck]:
    """One check per server-backed reward of the dataset YAML."""
    checks = []
    for name in sorted(reward_names):
        if name in SERVER_REWARDS or name.startswith("vlm_judge"):
            def reach(wait_s: float, name: str = name) -> Optional[str]:
                def build() -> None:
                    waiting = replace(reward_args, reward_health_timeout=wait_s)
                    for reward in build_rewards([name], waiting, check_ready=True).values():
                        reward.close()
                return _problem(build, RewardServerUnavailable)
            checks.append((f"reward {name}", reach))
    return checks


def judge_check(judge_args: JudgeArguments) -> ServerCheck:
    from ..eval.judge import UniGenBenchJudge

    def reach(wait_s: float) -> Optional[str]:
        def ready() -> None:
            with UniGenBenchJudge(replace(judge_args, judge_health_timeout=wait_s)) as judge:
                judge.check_ready()
        problem = _problem(ready, RewardServerUnavailable)
        return f"{problem} (or pass --eval_freq 0 to train without periodic evaluation)" if problem else None
    return f"UniGenBench judge at {judge_args.unigenbench_api_url}", reach


def await_servers(checks: list[ServerCheck], wait_s: float, progress: Callable[[str], None]) -> list[str]:
    """Run every check at once, each allowed the whole ``wait_s`` (``--server_wait``); a progress line names what
    is still awaited every PROGRESS_EVERY_S seconds. Returns the problems, in the checks' order."""
    if not checks:
        return []
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="preflight") as pool:
        futures = {pool.submit(check, wait_s): label for label, check in checks}
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=PROGRESS_EVERY_S)
            if pending:
                names = ", ".join(futures[f] for f in futures if f in pending)
                progress(f"preflight: waiting for {len(pending)} server(s) to answer ({names}): "
                         f"{time.monotonic() - start:.0f} s of --server_wait {wait_s:g} s")
        return [problem for future in futures for problem in [future.result()] if problem]


def _eval_datasets(training_args: GRPOConfig, data_args: DataArguments, problems: list[str]):
    """The eval sets when periodic evaluation is on and they parse (else None, the problem appended)."""
    if training_args.eval_freq <= 0:
        return None
    if not Path(data_args.eval_dataset_config).is_file():
        problems.append(f"EVAL_DATASET_CONFIG (--eval_dataset_config) = {data_args.eval_dataset_config!r} is "
                        "not a file (or pass --eval_freq 0 to train without periodic evaluation).")
        return None
    problem = check_eval_contents(data_args.eval_dataset_config)
    if problem:
        problems.append(problem)
        return None
    from ..eval.dataset import load_eval_datasets

    return load_eval_datasets(data_args.eval_dataset_config)


def _sftaux_datasets(training_args: GRPOConfig, data_args: DataArguments, problems: list[str]):
    if training_args.sftaux_coef <= 0:
        return None
    from ..sft import load_sftaux_config

    try:
        return load_sftaux_config(data_args.sftaux_dataset_config)
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"SFTAUX_DATASET_CONFIG (--sftaux_dataset_config): {err}")
        return None


@dataclass
class LocalReport:
    """What the flags and files say, before any server is awaited or model loaded."""

    problems: list[str]
    warnings: list[str]
    servers: list[ServerCheck]
    run_length: Optional[RunLength]


def local_checks(training_args: GRPOConfig, model_args: ModelArguments, data_args: DataArguments,
                 reward_args: RewardArguments, judge_args: JudgeArguments, world_size: int) -> LocalReport:
    """Every check that needs only flags and files, and the servers still to await."""
    problems = check_model_paths(model_args)
    batch = batch_problem(training_args, world_size, training_args.sftaux_coef > 0)
    problems += [p for p in [untrained_connector_problem(model_args), batch] if p]
    from ..trainer.replay import replay_problem
    from ..trainer.run_folder import OutputDirInUseError, claim_output_dir, resume_requested

    replay = replay_problem(training_args.replay_step, training_args.resume_from_checkpoint, training_args.output_dir)
    problems += [replay] if replay else []
    # the workers would refuse a used folder after the wait (a replay writes into a new one)
    if not resume_requested(training_args.resume_from_checkpoint) or training_args.replay_step:
        try:
            claim_output_dir(training_args.output_dir, overwrite=training_args.overwrite_output_dir, mover=False)
        except OutputDirInUseError as err:
            problems.append(str(err))
    servers: list[ServerCheck] = []
    length = None
    try:
        dataset = load_dataset_config(data_args.dataset_config, known_reward_names(reward_args), validate_paths=True)
    except (DatasetConfigError, FileNotFoundError, ValueError) as err:
        problems.append(f"DATASET_CONFIG (--dataset_config): {err}")
        dataset = None
    if dataset is not None:
        names = set(dataset.reward_names)
        content = check_prompt_contents(dataset)
        problems += content
        if names & set(CLIP_REWARDS):
            problems += [p for p in [check_clip_path(model_args.clip_model_name_or_path)] if p]
        servers += reward_server_checks(names, reward_args)
    eval_sets = _eval_datasets(training_args, data_args, problems)
    if training_args.eval_freq > 0:
        servers.append(judge_check(judge_args))
    sftaux_sets = _sftaux_datasets(training_args, data_args, problems)
    warnings = [w for w in [sftaux_idle_ranks_warning(training_args, world_size)] if w]
    if dataset is not None and not content:
        from ..data.prompts import PromptDataset

        try:
            length = run_length(training_args, sum(len(PromptDataset(entry)) for entry in dataset.datasets))
        except ValueError as err:  # --num_train_epochs <= 0 without --max_steps
            problems.append(str(err))
            return LocalReport(problems, warnings, servers, None)
        if batch is None:  # the JSON's batch keys are derived from the batch plan
            problems += [p for p in [deepspeed_problem(training_args, world_size, training_args.sftaux_coef > 0,
                                                       length.steps)] if p]
        if is_real_size_model(model_args):
            lines = shipped_data_lines(dataset, eval_sets, sftaux_sets, data_args)
            warnings += [shipped_data_warning(lines)] if lines else []
    return LocalReport(problems, warnings, servers, length)


def _report(problems: list[str], what: str) -> None:
    print(f"preflight: {len(problems)} {what} stop the launch:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m deepgen_rl.preflight [--world_size N] <training flags>``: 0 when the launch may go ahead."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--world_size", type=int, default=1)
    ours, argv = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    # EvalArguments (the last group) has nothing to probe.
    training_args, model_args, data_args, reward_args, judge_args, _ = parse_args_or_exit(argv)
    report = local_checks(training_args, model_args, data_args, reward_args, judge_args, max(1, ours.world_size))
    for warning in report.warnings:
        print(warning, file=sys.stderr, flush=True)
    if report.problems:  # named at once, without waiting for any server
        _report(report.problems, "problem(s) in the flags and files")
        print("preflight: the servers are checked once these are fixed.", file=sys.stderr)
        return 1
    if report.run_length is not None:
        print(f"preflight: {report.run_length.describe()}", flush=True)
    problems = await_servers(report.servers, reward_args.server_wait, lambda line: print(line, flush=True))
    if problems:
        _report(problems, "server problem(s)")
        return 1
    print("preflight: model paths, datasets and servers are ready.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
