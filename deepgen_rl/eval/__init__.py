"""UniGenBench evaluation (docs/upstream_compatibility.md#eval-yaml-and-unigenbench-csv): eval YAML + CSV, judge
client, aggregation, runner.

The trainer builds ``hook = make_eval_hook(training_args, data_args, judge_args, eval_args)`` at start-up (it reads
and checks the eval YAML; see ``deepgen_rl.trainer.eval_hook``) and, every ``--eval_freq`` steps, calls
``metrics = hook(model, step)`` on every rank: ``eval/<dataset>/overall``, ``eval/<dataset>/<dimension>``, ...

Standalone: ``python -m deepgen_rl.eval --help``.
"""

from deepgen_rl.eval.aggregate import Accuracy, DatasetScores, ImageJudgement, aggregate, aggregate_dataset
from deepgen_rl.eval.dataset import (
    BenchPrompt,
    EvalDataError,
    EvalDataset,
    EvalDatasetSpec,
    load_eval_config,
    load_eval_datasets,
    load_unigenbench_csv,
    primary_dimension,
)
from deepgen_rl.eval.judge import UniGenBenchJudge
from deepgen_rl.eval.judge_prompt import JudgeReplyError, parse_judge_scores, render_judge_prompt
from deepgen_rl.eval.report import DatasetReport, EvalReport, metrics_for_logging, write_report
from deepgen_rl.eval.runner import (
    GenerateFn,
    GenerationSettings,
    evaluate_model,
    make_eval_hook,
    model_generate_fn,
    run_evaluation,
)

__all__ = [
    "Accuracy", "BenchPrompt", "DatasetReport", "DatasetScores", "EvalDataError", "EvalDataset", "EvalDatasetSpec",
    "EvalReport", "GenerateFn", "GenerationSettings", "ImageJudgement", "JudgeReplyError",
    "UniGenBenchJudge", "aggregate", "aggregate_dataset", "evaluate_model", "load_eval_config", "load_eval_datasets",
    "load_unigenbench_csv", "make_eval_hook", "metrics_for_logging", "model_generate_fn", "parse_judge_scores",
    "primary_dimension", "render_judge_prompt", "run_evaluation", "write_report",
]
