"""Experiment logging on rank 0: metrics.jsonl in --output_dir, wandb / swanlab through --report_to, sample grids.

Both trackers run OFFLINE unless the user says otherwise (the guide: ``WANDB_MODE`` / ``SWANLAB_MODE``,
``WANDB_PROJECT`` / ``SWANLAB_PROJ_NAME``); the entry point reads those variables into
:class:`TrackerSettings` once (``TrackerSettings.from_env``), nothing here reads the environment.

Files written under --output_dir:
    metrics.jsonl                 one JSON object per optimizer step ({"step": N, "reward/mean": ..., ...})
    samples/step_NNNNNN.png       a grid of rollout images (one row per prompt, rollout_n columns)
    samples/step_NNNNNN.txt       the prompts and rewards of that grid's rows
    reward_curve.png              mean reward per step (written when training ends)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from deepgen_rl.core.images import image_grid

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "DeepGen-RL"
DEFAULT_TRACKER_MODE = "offline"
SUPPORTED_TRACKERS = ("wandb", "swanlab")
METRICS_FILE = "metrics.jsonl"
REWARD_CURVE_FILE = "reward_curve.png"
REWARD_CURVE_KEY = "reward/mean"


@dataclass(frozen=True)
class TrackerSettings:
    report_to: tuple[str, ...]
    run_name: str
    wandb_mode: str = DEFAULT_TRACKER_MODE
    wandb_project: str = DEFAULT_PROJECT
    swanlab_mode: str = DEFAULT_TRACKER_MODE
    swanlab_project: str = DEFAULT_PROJECT

    @classmethod
    def from_env(cls, report_to: Sequence[str] | str | None, run_name: Optional[str],
                 environ: Mapping[str, str]) -> "TrackerSettings":
        """Resolve --report_to ("all" = wandb + swanlab, "none" = neither) and the trackers' env variables."""
        names = [report_to] if isinstance(report_to, str) else list(report_to or [])
        names = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
        if "all" in names:
            names = list(SUPPORTED_TRACKERS)
        names = [n for n in names if n != "none"]
        unknown = [n for n in names if n not in SUPPORTED_TRACKERS]
        if unknown:
            raise ValueError(f"--report_to {', '.join(unknown)} is not supported by the GRPO trainer; use "
                             f"{', '.join(SUPPORTED_TRACKERS)}, all or none.")
        return cls(
            report_to=tuple(dict.fromkeys(names)),
            run_name=run_name or "deepgen-grpo",
            wandb_mode=environ.get("WANDB_MODE", DEFAULT_TRACKER_MODE),
            wandb_project=environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            swanlab_mode=environ.get("SWANLAB_MODE", DEFAULT_TRACKER_MODE),
            swanlab_project=environ.get("SWANLAB_PROJ_NAME", DEFAULT_PROJECT),
        )


class MetricsLogger:
    """Logs on the main process only (every method is a no-op elsewhere). Close it in ``finally``."""

    def __init__(self, output_dir: str | Path, settings: TrackerSettings, *, is_main: bool,
                 run_config: Optional[Mapping[str, Any]] = None, resume_step: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.is_main = is_main
        self._wandb = None
        self._swanlab = None
        self._jsonl = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl_path = self.output_dir / METRICS_FILE
        self._truncate_after(resume_step)
        self._jsonl = self._jsonl_path.open("a", encoding="utf-8")
        config = dict(run_config or {})
        if "wandb" in settings.report_to:
            import wandb

            self._wandb = wandb.init(project=settings.wandb_project, name=settings.run_name, mode=settings.wandb_mode,
                                     dir=str(self.output_dir), config=config)
        if "swanlab" in settings.report_to:
            import swanlab

            self._swanlab = swanlab.init(project=settings.swanlab_project, name=settings.run_name,
                                         mode=settings.swanlab_mode, log_dir=str(self.output_dir / "swanlog"),
                                         config=config)

    def _truncate_after(self, step: int) -> None:
        """On resume drop lines of steps after the checkpoint (they are about to be redone), and a torn line."""
        if not self._jsonl_path.is_file():
            return
        kept = [record for record in read_jsonl(self._jsonl_path) if record.get("step", 0) <= step]
        self._jsonl_path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        if self._swanlab is not None:
            self._swanlab.log(dict(metrics), step=step)

    def log_samples(self, step: int, images: torch.Tensor, prompts: Sequence[str], rewards: Optional[Sequence[float]],
                    columns: int, sources: Optional[torch.Tensor] = None) -> Optional[Path]:
        """Save a grid of ``images`` [N, 3, H, W] (rows = prompts) as PNG + a caption file; send it to trackers.

        ``rewards`` None: the images were not scored (the EMA weights' grid under --ema_decay). ``sources``
        [N / columns, 3, H, W] (edit datasets): each row's source, shown in a first column before its edits."""
        if not self.is_main:
            return None
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:06d}.png"
        if sources is None:
            grid = image_grid(images, columns)
        else:
            from deepgen_rl.trainer.edit_rollout import prepend_sources

            grid = image_grid(prepend_sources(images, sources, columns), columns + 1)
        grid.save(path)
        lines = [f"row {row}: {prompts[row * columns]!r}  " + ("" if sources is None else "(first tile: source) ")
                 + ("EMA weights (not scored)" if rewards is None else "rewards: "
                    + ", ".join(f"{r:.4f}" for r in rewards[row * columns:(row + 1) * columns]))
                 for row in range(math.ceil(len(prompts) / columns))]
        path.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        caption = f"step {step}: " + " | ".join(prompts[::columns])
        if self._wandb is not None:
            import wandb

            self._wandb.log({"samples": wandb.Image(grid, caption=caption)}, step=step)
        if self._swanlab is not None:
            import swanlab

            self._swanlab.log({"samples": swanlab.Image(grid, caption=caption)}, step=step)
        return path

    def close(self) -> None:
        if not self.is_main:
            return
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            try:
                plot_metric_curve(self.output_dir / METRICS_FILE, REWARD_CURVE_KEY, self.output_dir / REWARD_CURVE_FILE)
            except Exception as err:  # a plot must never hide the training result
                logger.warning("could not plot %s: %s", REWARD_CURVE_FILE, err)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._swanlab is not None:
            self._swanlab.finish()
            self._swanlab = None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order (a torn line dropped with a warning: :func:`read_jsonl`)."""
    return read_jsonl(path)


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL log, one per line, in order.

    A line that is not a JSON object is dropped with a warning naming the file and line: a process killed (or a
    disk filled) mid-write leaves its last line torn, and an auto-restarted job must still resume from it."""
    records = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            logger.warning("%s line %d is not valid JSON (a write cut short?): dropped (%s: %.80r)", path, number,
                           err, line)
            continue
        if not isinstance(record, dict):
            logger.warning("%s line %d is not a JSON object: dropped (%.80r)", path, number, line)
            continue
        records.append(record)
    return records


def trailing_mean(values: list[float], width: int) -> list[float]:
    """values (n) -> n means, each of the value and up to ``width`` - 1 values before it."""
    return [sum(values[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]


def plot_metric_curve(metrics_path: Path, key: str, output: Path, smooth: int = 0) -> Optional[Path]:
    """A PNG line plot of ``key`` against the step (None when no record has it); ``smooth`` > 1 draws the raw
    points faintly and their trailing mean over ``smooth`` steps as the line (for rewards that jump with each
    step's prompt draw)."""
    if not Path(metrics_path).is_file():
        return None
    points = [(r["step"], r[key]) for r in read_metrics(metrics_path) if isinstance(r.get(key), (int, float))]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = [p[0] for p in points], [p[1] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if smooth > 1:
        trailing = trailing_mean(values, smooth)
        ax.plot(steps, values, marker="o", markersize=2, linewidth=0.5, alpha=0.35, label="per step")
        ax.plot(steps, trailing, linewidth=2, label=f"mean of the last {smooth} steps")
        ax.legend()
    else:
        ax.plot(steps, values, marker="o", markersize=2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
