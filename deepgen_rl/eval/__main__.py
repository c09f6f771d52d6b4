"""Evaluate a DeepGen checkpoint (or the built-in tiny model) on UniGenBench and on edit sets against running judges.

    # the judge: bash scripts/eval_unigenbench_evalmodel.sh   (vLLM)
    export SD3_5_MODEL_NAME_OR_PATH=... QWEN2_5_VL_MODEL_NAME_OR_PATH=... CHECKPOINT=...
    python -m deepgen_rl.eval --output_dir outputs/eval_ckpt [--unigenbench_api_url http://host:PORT]
    torchrun --nproc_per_node 8 -m deepgen_rl.eval --output_dir ...      # prompts and judge calls over 8 GPUs

    # an RL checkpoint, layered on CHECKPOINT (the pretraining .pth) as the converter's output is meant to be used:
    python -m deepgen_rl.eval --output_dir outputs/eval_step40 --rl_checkpoint outputs/run/checkpoint-40
    python -m deepgen_rl.eval --output_dir outputs/eval_step40 --rl_checkpoint rl_step40.pth   # converted

    # no weights: a tiny random model, for checking the plumbing end to end
    python -m deepgen_rl.eval --tiny --output_dir /tmp/eval_tiny --eval_max_prompts 4

Writes report.json, summary.csv, judgements.csv and samples/ into --output_dir and prints the accuracies.
Edit sets (eval YAML entries with ``scoring: edit_judge``: an edit JSONL, eval/edit_eval.py) are edited by the model
and scored by the edit VLM judge (--edit_judge_url / EDIT_JUDGE_URL, as in training); their metrics are printed and
written to edit_eval.json. A YAML of edit sets only needs no UniGenBench judge.
Model flags (--sd3_model_name_or_path, --checkpoint, ...), judge flags (--unigenbench_api_url,
--unigenbench_model_name, --judge_timeout, ...) and evaluation flags (--eval_max_prompts, --eval_timeout,
--eval_num_sample_images) are the training run's; --eval_dataset_config picks the YAML.
Exit status: 0 when the evaluation is complete (every planned image judged, in UniGenBench and edit sets alike),
1 otherwise: an image the judge could not score (no judge reachable, a malformed reply after retries) or a rank that
did not report makes the report incomplete (``complete: false``, ``eval/complete: 0``), and the accuracies then cover
the judged images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser

from deepgen_rl.config import DataArguments, EvalArguments, GRPOConfig, JudgeArguments, ModelArguments, RewardArguments

logger = logging.getLogger("deepgen_rl.eval")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


@dataclass
class EvalCliArguments:
    """Flags of the standalone evaluation; defaults not set here are the training run's (GRPOConfig)."""

    output_dir: str = field(metadata={"help": "Folder for report.json, summary.csv, judgements.csv and samples/."})
    tiny: bool = field(
        default=False,
        metadata={"help": "Evaluate a tiny random DeepGen model built in memory instead of the model paths + "
                  "CHECKPOINT (no weights needed; scores are meaningless, the plumbing is real)."},
    )
    rl_checkpoint: str = field(
        default="",
        metadata={"help": "An RL checkpoint to evaluate, loaded ON TOP of the model paths + CHECKPOINT (it holds only "
                  "what RL trained): a checkpoint-N folder written by the trainer, or the .pth "
                  "scripts/utils/rlckpt_to_sftckpt.py made of one. Empty: evaluate CHECKPOINT itself."},
    )
    rl_weights: str = field(
        default="raw",
        metadata={"help": "With a checkpoint-N folder as --rl_checkpoint: 'raw' (the trained weights) or 'ema' "
                  "(their EMA, checkpoint-N/ema.pt of a run with --ema_decay > 0)."},
    )
    step: int = field(default=0, metadata={"help": "Training step recorded in the report."})
    image_height: Optional[int] = field(
        default=None, metadata={"help": f"Image height. Default: {GRPOConfig.image_height} (64 with --tiny)."}
    )
    image_width: Optional[int] = field(
        default=None, metadata={"help": f"Image width. Default: {GRPOConfig.image_width} (64 with --tiny)."}
    )
    seed: int = field(default=GRPOConfig.seed, metadata={"help": "Seed of the initial noise (and the tiny model)."})
    micro_batch_size: int = field(
        default=GRPOConfig.rollout_micro_batch_size, metadata={"help": "Images per generation forward per GPU."}
    )
    vae_decode_micro_batch_size: int = field(
        default=GRPOConfig.vae_decode_micro_batch_size, metadata={"help": "Images per VAE decode per GPU."}
    )
    device: str = field(default="auto", metadata={"help": "'auto' (cuda:LOCAL_RANK when available, else cpu), "
                                                          "'cpu' or 'cuda'."})

    def __post_init__(self) -> None:
        for flag in ("image_height", "image_width"):
            value = getattr(self, flag)
            if value is not None and (value <= 0 or value % 16):
                raise ValueError(f"--{flag} must be a positive multiple of 16; got {value}.")
        for flag in ("micro_batch_size", "vae_decode_micro_batch_size"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"--{flag} must be a positive integer; got {getattr(self, flag)}.")
        if self.rl_weights not in ("raw", "ema"):
            raise ValueError(f"--rl_weights must be raw or ema; got {self.rl_weights!r}.")
        if self.rl_checkpoint and not Path(self.rl_checkpoint).expanduser().exists():
            raise ValueError(f"--rl_checkpoint {self.rl_checkpoint!r} does not exist: expected a checkpoint-N folder "
                             "written by the trainer or a .pth converted from one.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda; got {self.device!r}.")


def _setup_distributed(device_flag: str):
    """Join the torchrun group when launched with WORLD_SIZE > 1; returns the torch device to use."""
    import torch
    import torch.distributed as dist

    from deepgen_rl.core.distributed import is_distributed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device


def _build_model(cli: EvalCliArguments, model_args: ModelArguments, device):
    if cli.tiny:
        from deepgen_rl.model.tiny import build_tiny_deepgen

        model = build_tiny_deepgen(seed=cli.seed)
    else:
        from deepgen_rl.model import load_deepgen_model

        model = load_deepgen_model(model_args, device=device)
    if cli.rl_checkpoint:
        from deepgen_rl.model.convert import load_rl_checkpoint_into

        summary = load_rl_checkpoint_into(model, Path(cli.rl_checkpoint).expanduser(), cli.rl_weights,
                                          model_args.trainable_modules)
        logger.info("RL checkpoint layered on the model: %s", summary.describe().splitlines()[0])
    return model.to(device).eval()


def _print_summary(report) -> None:
    from deepgen_rl.eval.report import metrics_for_logging

    for entry in report.datasets:
        scores = entry.scores
        overall = scores.overall.value
        print(f"[{entry.spec.name}] overall {'n/a' if overall is None else f'{overall:.4f}'} "
              f"({scores.overall.correct}/{scores.overall.total} test points; images: {entry.planned_images} planned, "
              f"{scores.failed_images} failed, {entry.missing_images} missing)")
        for dimension, accuracy in scores.per_dimension.items():
            print(f"    {dimension}: {accuracy.value:.4f} ({accuracy.correct}/{accuracy.total})")
        for error in scores.errors[:3]:
            print(f"    failure: {error}")
    print(json.dumps(metrics_for_logging(report), indent=1, ensure_ascii=False))
    print(f"report: {report.output_dir}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = HfArgumentParser((EvalCliArguments, ModelArguments, DataArguments, JudgeArguments, EvalArguments,
                               RewardArguments),  # the edit judge's flags (--edit_judge_url ...), as in training
                              prog="python -m deepgen_rl.eval",
                              description=__doc__, formatter_class=_HelpFormatter)
    try:
        cli, model_args, data_args, judge_args, eval_args, reward_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a bad value: its message, not a traceback through the dataclasses
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per judge request otherwise

    from deepgen_rl.eval.dataset import load_eval_datasets
    from deepgen_rl.eval.edit_eval import load_edit_eval_sets

    # A bad YAML, CSV or edit JSONL fails here, before any model loads.
    datasets = load_eval_datasets(data_args.eval_dataset_config, eval_args.eval_max_prompts)
    edit_sets = load_edit_eval_sets(data_args.eval_dataset_config, eval_args.eval_max_prompts)
    from deepgen_rl.core.distributed import destroy, is_distributed

    joined_here = not is_distributed()  # a caller's group (a test's, a notebook's) is the caller's to tear down
    device = _setup_distributed(cli.device)
    from deepgen_rl.model import CheckpointError, ModelPathError

    try:
        return _evaluate(cli, model_args, judge_args, eval_args, datasets, device, edit_sets, reward_args)
    except (ModelPathError, CheckpointError) as err:  # a path or file the user gave: the fix, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if joined_here:
            destroy()


def _evaluate(cli: EvalCliArguments, model_args: ModelArguments, judge_args: JudgeArguments, eval_args: EvalArguments,
              datasets, device, edit_sets=(), reward_args: Optional[RewardArguments] = None) -> int:
    from deepgen_rl.eval.runner import GenerationSettings

    default_size = 64 if cli.tiny else None
    height = cli.image_height or default_size or GRPOConfig.image_height
    width = cli.image_width or default_size or GRPOConfig.image_width
    settings = GenerationSettings(height=height, width=width, seed=cli.seed, micro_batch_size=cli.micro_batch_size,
                                  decode_micro_batch_size=cli.vae_decode_micro_batch_size)
    edit_judge = None
    if edit_sets:  # awaited (/health) before the model loads: an unreachable judge is named in seconds
        from deepgen_rl.rewards.registry import build_rewards

        edit_judge = build_rewards(["edit_vlm_judge"], reward_args or RewardArguments(), "", "cpu")["edit_vlm_judge"]
    try:
        return _generate_and_judge(cli, model_args, judge_args, eval_args, datasets, device, edit_sets, edit_judge,
                                   settings)
    finally:
        if edit_judge is not None:
            edit_judge.close()


def _generate_and_judge(cli: EvalCliArguments, model_args: ModelArguments, judge_args: JudgeArguments,
                        eval_args: EvalArguments, datasets, device, edit_sets, edit_judge, settings) -> int:
    from deepgen_rl.core.distributed import rank_and_world
    from deepgen_rl.eval.runner import model_generate_fn, run_evaluation

    height, width = settings.height, settings.width
    model = _build_model(cli, model_args, device)
    ok = True
    if datasets:  # a YAML of edit sets only needs no UniGenBench judge
        report = run_evaluation(model_generate_fn(model, height, width, cli.micro_batch_size,
                                                  cli.vae_decode_micro_batch_size),
                                judge_args, eval_args, datasets, settings, cli.output_dir, cli.step)
        if rank_and_world()[0] == 0:
            _print_summary(report)
        ok = report.complete
    if edit_sets:
        ok = _evaluate_edits(model, edit_sets, edit_judge, settings, cli.output_dir) and ok
    return 0 if ok else 1


def _evaluate_edits(model, edit_sets, judge, settings, output_dir: str) -> bool:
    """Edit and judge every edit set (eval/edit_eval.py); prints the metrics; True when every edit was judged."""
    from deepgen_rl.core.distributed import rank_and_world
    from deepgen_rl.eval.edit_eval import evaluate_edit_sets
    from deepgen_rl.eval.report import METRIC_PREFIX

    metrics = evaluate_edit_sets(model, judge, edit_sets, height=settings.height, width=settings.width,
                                 seed=settings.seed, micro_batch_size=settings.micro_batch_size,
                                 output_dir=output_dir)
    if rank_and_world()[0] == 0:
        print(json.dumps(metrics, indent=1, ensure_ascii=False))
    # Complete = every edit judged, as for UniGenBench: a failed edit makes the evaluation incomplete.
    return all(metrics.get(f"{METRIC_PREFIX}/{s.spec.name}/failed_images", 1.0) == 0
               and metrics.get(f"{METRIC_PREFIX}/{s.spec.name}/judged_images", 0.0) > 0 for s in edit_sets)


if __name__ == "__main__":
    sys.exit(main())
