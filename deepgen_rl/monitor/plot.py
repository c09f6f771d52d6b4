"""``monitor.png``: each image statistic's z-score over the steps with the alarm threshold (top), and the training
reward against the held-out score (bottom). Written by rank 0 at each evaluation and checkpoint and at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def plot_monitor(path: str | Path, z_history: Sequence[tuple[int, Mapping[str, float]]], z_threshold: float,
                 rewards: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]], eval_metric: str,
                 alarms: Sequence[dict] = ()) -> Path:
    """Draw the two panels into ``path`` (PNG, written atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=80, sharex=True)
    names = sorted({name for _, zs in z_history for name in zs})
    for name in names:
        points = [(step, zs[name]) for step, zs in z_history if name in zs]
        top.plot([s for s, _ in points], [z for _, z in points], label=name, linewidth=1.2)
    if z_threshold > 0:
        for sign in (1, -1):
            top.axhline(sign * z_threshold, color="red", linestyle="--", linewidth=1)
    for alarm in alarms:
        top.axvline(alarm["step"], color="black", linestyle=":", linewidth=1)
    top.set_ylabel("z vs baseline (t-test, normal scale)")
    top.set_title("image statistics (dashed: --monitor_z; dotted: alarms)", fontsize=9)
    if names:
        top.legend(fontsize=7, ncol=4, loc="upper left")
    if rewards:
        bottom.plot([s for s, _ in rewards], [v for _, v in rewards], color="tab:blue", label="train reward/mean")
    bottom.set_ylabel("train reward", color="tab:blue")
    bottom.set_xlabel("step")
    if evals:
        held_out = bottom.twinx()
        held_out.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="tab:orange", label=eval_metric)
        held_out.set_ylabel(f"held-out {eval_metric}", color="tab:orange", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path
