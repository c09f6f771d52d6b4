"""Evaluation of editing: a user-supplied edit JSONL (data/edit_prompts.py) scored by the edit VLM judge, reported
beside UniGenBench (docs/upstream_compatibility.md#eval-yaml-and-unigenbench-csv, issue 17 item 5).

An eval YAML entry with ``scoring: edit_judge`` names an edit JSONL; for each of its instructions the model
generates ``duplicates`` edits (ODE, the entry's cfg_scale and steps, noise seeded by the run's seed and the
prompt's index) and the judge (``edit_vlm_judge``: source + result + instruction, score in [0, 1]) scores them.
Prompts are spread over the ranks; every rank runs the same number of generation forwards (a rank short of
prompts repeats its last and drops the result), as ZeRO-3 needs. Reported per set: the mean score of the judged
edits and how many failed (never scored 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from deepgen_rl.data.edit_prompts import EditPrompt, read_edit_file
from deepgen_rl.data.prompts import PromptSample
from deepgen_rl.core.distributed import rank_and_world, seeded_generator
from deepgen_rl.eval.dataset import EDIT_SCORING, EvalDataError, EvalDatasetSpec, load_eval_config
from deepgen_rl.eval.report import METRIC_PREFIX
from deepgen_rl.rewards.reward_step import images_to_pil
from deepgen_rl.sampling.edit_conditioning import build_edit_conditioning

EDIT_REPORT_NAME = "edit_eval.json"


@dataclass(frozen=True)
class EditEvalSet:
    spec: EvalDatasetSpec
    prompts: tuple[EditPrompt, ...]


def load_edit_eval_sets(config_path: str | Path, max_prompts: int = 0) -> list[EditEvalSet]:
    """The ``scoring: edit_judge`` entries of the eval YAML with their edit JSONL parsed (errors name file + line);
    ``max_prompts`` > 0 keeps the first N of each."""
    sets = []
    for spec in load_eval_config(config_path):
        if spec.scoring != EDIT_SCORING:
            continue
        try:
            prompts = read_edit_file(spec.path, spec.name)
        except (ValueError, FileNotFoundError) as err:
            raise EvalDataError(f"eval dataset {spec.name} (scoring: {EDIT_SCORING}): {err}") from None
        sets.append(EditEvalSet(spec, tuple(prompts[:max_prompts] if max_prompts else prompts)))
    return sets


def rank_share(num_prompts: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """(this rank's prompt indices, round-robin; the padded count every rank runs = ceil(num_prompts / world))."""
    return list(range(rank, num_prompts, world_size)), -(-num_prompts // world_size)


def edit_eval_seed(seed: int, index: int) -> int:
    """The noise seed of prompt ``index``'s edits: the same on any number of ranks."""
    return seed * 1_000_003 + index


def evaluate_edit_set(model, judge, edit_set: EditEvalSet, *, height: int, width: int, seed: int,
                      micro_batch_size: Optional[int] = None) -> dict[str, float]:
    """Generate and judge this rank's share of one edit set; sums over all ranks -> the set's metrics."""
    from deepgen_rl.sampling import generate_images

    spec = edit_set.spec
    rank, world_size = rank_and_world()
    indices, padded = rank_share(len(edit_set.prompts), rank, world_size)
    total = torch.zeros(3, dtype=torch.float64)  # [sum of scores, judged, failed]
    for position in range(padded):
        index = indices[min(position, len(indices) - 1)] if indices else 0
        prompt = edit_set.prompts[index]
        sample = PromptSample(prompt.instruction, spec.name, {}, index, prompt.source_images, prompt.target_text)
        with torch.no_grad():
            edit = build_edit_conditioning(model, [sample] * spec.duplicates, 1, height * width)
        generator = seeded_generator(torch.device("cpu"), edit_eval_seed(seed, index))
        images = generate_images(model, [prompt.instruction] * spec.duplicates, height=height, width=width,
                                 num_inference_steps=spec.num_inference_steps, cfg_scale=spec.cfg_scale,
                                 generator=generator, micro_batch_size=micro_batch_size, edit=edit)
        if position >= len(indices):
            continue  # padding: the forwards ran for lockstep, the result is not this rank's
        scores = judge.score(images_to_pil(images), [prompt.instruction] * spec.duplicates,
                             [index] * spec.duplicates, sources=edit.source_pil())
        judged = [value for value in scores.values if value is not None]
        total += torch.tensor([sum(judged), len(judged), len(scores.values) - len(judged)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        device = next(model.parameters()).device
        reduced = total.to(device)
        dist.all_reduce(reduced)
        total = reduced.cpu()
    prefix = f"{METRIC_PREFIX}/{spec.name}"
    metrics = {f"{prefix}/judged_images": float(total[1]), f"{prefix}/failed_images": float(total[2])}
    if total[1] > 0:  # a mean over no judged edit is left out, never logged as 0
        metrics[f"{prefix}/edit_score"] = float(total[0] / total[1])
    return metrics


def evaluate_edit_sets(model, judge, sets: Sequence[EditEvalSet], *, height: int, width: int, seed: int,
                       micro_batch_size: Optional[int] = None, output_dir: Optional[Path] = None) -> dict[str, float]:
    """Every edit set's metrics; rank 0 also writes them to ``output_dir/edit_eval.json``."""
    if sets and judge is None:
        raise EvalDataError(f"eval datasets {', '.join(s.spec.name for s in sets)} score with {EDIT_SCORING}, "
                            "but no edit judge was built: set --edit_judge_url / EDIT_JUDGE_URL.")
    metrics: dict[str, float] = {}
    for edit_set in sets:
        metrics.update(evaluate_edit_set(model, judge, edit_set, height=height, width=width, seed=seed,
                                         micro_batch_size=micro_batch_size))
    if sets and output_dir is not None and rank_and_world()[0] == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / EDIT_REPORT_NAME).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return metrics


@dataclass(frozen=True)
class EvalEditJudge:
    """The judge of the eval YAML's edit sets. ``owned``: built for evaluation alone, so whoever evaluates closes it
    (a training reward's client belongs to the reward step, which closes it)."""

    client: object
    owned: bool


def edit_judge_for_eval(eval_config: str, reward_args, rewards) -> Optional[EvalEditJudge]:
    """The edit judge of the eval YAML's edit sets: the run's ``edit_vlm_judge`` reward client when it trains with
    one, else a client built from the reward flags (--edit_judge_url ...; waits for its /health); None when no
    entry is an edit set. Call it only once evaluation is known to run: the client it builds is the caller's."""
    if not eval_config or not any(spec.scoring == EDIT_SCORING for spec in load_eval_config(eval_config)):
        return None
    if "edit_vlm_judge" in rewards:
        return EvalEditJudge(rewards["edit_vlm_judge"], owned=False)
    from deepgen_rl.rewards.registry import build_rewards

    return EvalEditJudge(build_rewards(["edit_vlm_judge"], reward_args, "", "cpu")["edit_vlm_judge"], owned=True)


def evaluate_edits_now(model, training_args, judge, sets: Sequence[EditEvalSet], step: int) -> dict[str, float]:
    """The trainer hook's edit half: the model in eval mode, files under <output_dir>/eval/step_<step>."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_edit_sets(model, judge, sets, height=training_args.image_height,
                                  width=training_args.image_width, seed=training_args.seed,
                                  micro_batch_size=training_args.rollout_micro_batch_size,
                                  output_dir=Path(training_args.output_dir) / "eval" / f"step_{step}")
    finally:
        model.train(was_training)
