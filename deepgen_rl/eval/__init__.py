"""UniGenBench evaluation (DESIGN.md section 8): eval YAML + CSV, judge client, aggregation, runner.

The trainer calls, on every rank after each optimizer step::

    report = periodic_eval(model, training_args, data_args, judge_args, step)     # None unless step % eval_freq == 0
    if report is not None and is_main_process:
        log(metrics_for_logging(report))    # eval/<dataset>/overall, eval/<dataset>/<dimension>, ...

or, when it decides itself when to evaluate, ``hook = make_eval_hook(training_args, data_args, judge_args)`` at start-up
(reads and checks the eval YAML) and ``metrics = hook(model, step)`` on every rank.

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
    EvalSettings,
    GenerateFn,
    evaluate_model,
    make_eval_hook,
    model_generate_fn,
    periodic_eval,
    run_evaluation,
    should_evaluate,
)

__all__ = [
    "Accuracy", "BenchPrompt", "DatasetReport", "DatasetScores", "EvalDataError", "EvalDataset", "EvalDatasetSpec",
    "EvalReport", "EvalSettings", "GenerateFn", "ImageJudgement", "JudgeReplyError",
    "UniGenBenchJudge", "aggregate", "aggregate_dataset", "evaluate_model", "load_eval_config", "load_eval_datasets",
    "load_unigenbench_csv", "make_eval_hook", "metrics_for_logging", "model_generate_fn", "parse_judge_scores",
    "periodic_eval", "primary_dimension", "render_judge_prompt", "run_evaluation", "should_evaluate", "write_report",
]
