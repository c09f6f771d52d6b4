"""Check, before launching, everything a training run needs from outside the code.

``scripts/train.sh`` runs ``python -m deepgen_rl.preflight <the same flags>`` before ``torchrun``: a wrong model
path, a missing prompt file or a reward server that is down is reported in seconds, every problem at once,
each naming the variable or URL and how to fix it, instead of failing after every rank has loaded the model.

Checked: the model folders and CHECKPOINT (by the loader's own checks, then a weights-only open), the dataset
YAML and its prompt files (their contents too: ``preflight_content``), the CLIP folder when a dataset uses
``clip_sim``, the reward servers the YAML's rewards need, and, when periodic evaluation is on, the eval CSVs and
the UniGenBench judge.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from .config import CLIP_ENV, DataArguments, GRPOConfig, JudgeArguments, ModelArguments, RewardArguments, parse_args
from .data.dataset_yaml import DatasetConfigError, load_dataset_config
from .model.loading import ModelPathError, check_checkpoint_path, check_qwen_path, check_sd3_path
from .preflight_content import check_checkpoint_loads, check_eval_contents, check_prompt_contents
from .rewards.http_utils import RewardServerUnavailable
from .rewards.registry import build_rewards

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


def check_reward_servers(reward_names: set[str], reward_args: RewardArguments) -> list[str]:
    problems = []
    for name in SERVER_REWARDS:
        if name in reward_names:
            def reach(name: str = name) -> None:
                for reward in build_rewards([name], reward_args, check_ready=True).values():
                    reward.close()
            problem = _problem(reach, RewardServerUnavailable)
            if problem:
                problems.append(problem)
    return problems


def check_judge(judge_args: JudgeArguments) -> Optional[str]:
    from .eval.judge import UniGenBenchJudge

    def reach() -> None:
        with UniGenBenchJudge(judge_args) as judge:
            judge.check_ready()

    problem = _problem(reach, RewardServerUnavailable)
    return f"{problem} (or pass --eval_freq 0 to train without periodic evaluation)" if problem else None


def collect_problems(training_args: GRPOConfig, model_args: ModelArguments, data_args: DataArguments,
                     reward_args: RewardArguments, judge_args: JudgeArguments) -> list[str]:
    problems = check_model_paths(model_args)
    try:
        dataset = load_dataset_config(data_args.dataset_config, validate_paths=True)
    except (DatasetConfigError, FileNotFoundError) as err:
        problems.append(f"DATASET_CONFIG (--dataset_config): {err}")
        dataset = None
    if dataset is not None:
        names = set(dataset.reward_names)
        problems += check_prompt_contents(dataset)
        if names & set(CLIP_REWARDS):
            problems += [p for p in [check_clip_path(model_args.clip_model_name_or_path)] if p]
        problems += check_reward_servers(names, reward_args)
    if training_args.eval_freq > 0:
        if not Path(data_args.eval_dataset_config).is_file():
            problems.append(f"EVAL_DATASET_CONFIG (--eval_dataset_config) = {data_args.eval_dataset_config!r} is "
                            "not a file (or pass --eval_freq 0 to train without periodic evaluation).")
        else:
            problems += [p for p in [check_eval_contents(data_args.eval_dataset_config), check_judge(judge_args)] if p]
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    # EvalArguments (the last group) has nothing to probe.
    training_args, model_args, data_args, reward_args, judge_args, _ = parse_args(argv)
    problems = collect_problems(training_args, model_args, data_args, reward_args, judge_args)
    if problems:
        print(f"preflight: {len(problems)} problem(s) stop the launch:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("preflight: model paths, datasets and servers are ready.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
