"""Run as a script (under torchrun, any world size): grpo_deepgen's run, recording what each GRPO step drew and
produced on this rank, for tests/test_world_size_invariance.py.

    torchrun --nproc_per_node W tests/invariance_run.py --record_dir DIR <grpo_deepgen flags>

Writes DIR/rank<r>.pt: {step: {"prompts": [(dataset, index)], "x0": [N, C, h, w] initial noise,
"final": [N, C, h, w] x_T, "images": [N, 3, H, W], "scores": [N, K], "advantages": [N]}} (step 1-based, as logged),
and on rank 0 DIR/params.pt: every trainable parameter (fp32, whole: ZeRO-2 keeps them unpartitioned) before and
after training.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainer_utils import _pop_flag, build_trainer_from_argv  # run as a script: tests/ is on sys.path


def _record(trainer, records: dict) -> None:
    """Wrap the trainer's phases to keep (a CPU copy of) what each step drew and produced."""
    rollout_phase, reward_phase, advantage_phase = trainer.rollout_phase, trainer.reward_phase, trainer.advantage_phase

    def current() -> dict:
        return records.setdefault(trainer.state.global_step + 1, {})

    def rollout(step):
        batch = rollout_phase(step)
        trajectory = batch.trajectory
        current().update(prompts=[(s.dataset, s.index) for s in batch.samples],
                         x0=trajectory.latents[:, 0].detach().cpu().clone())
        return batch

    def rewards(batch):
        result = reward_phase(batch)
        current().update(images=batch.images.detach().cpu().clone(), scores=result.scores.detach().cpu().clone())
        return result

    def advantages(reward_batch):
        result, metrics = advantage_phase(reward_batch)
        current()["advantages"] = None if result is None else result.advantages.detach().cpu().clone()
        return result, metrics

    trainer.rollout_phase, trainer.reward_phase, trainer.advantage_phase = rollout, rewards, advantages


def _trainable(trainer) -> dict:
    return {name: p.detach().to("cpu").float().clone() for name, p in trainer.model.named_parameters()
            if p.requires_grad}


def main(argv: list[str]) -> int:
    argv, record_dir = _pop_flag(argv, "--record_dir")
    import torch

    args, trainer = build_trainer_from_argv(argv)
    records: dict = {}
    _record(trainer, records)
    try:
        before = _trainable(trainer)
        trainer.train()
        after = _trainable(trainer)
    finally:
        trainer.close()
    folder = Path(record_dir)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(records, folder / f"rank{trainer.rank}.pt")
    if trainer.rank == 0:
        torch.save({"before": before, "after": after, "learning_rate": args.learning_rate}, folder / "params.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
