"""FLOPs of one trained timestep under --optimizer_step_schedule reference, --kl_forward shared vs separate.

Counts, with torch's FlopCounterMode, every FLOP of the train phase of one GRPO step of the in-process tiny trainer
(one rank, DeepSpeed ZeRO-2 on CPU, gradient checkpointing on, one trained timestep, its samples in one chunk,
SFT-aux off), and expresses it in DiT forwards F of that chunk: F is measured as the FLOPs of the reference policy's
forward (one DiT forward under no_grad at the chunk's shape). docs/algorithms.md ("The KL step's forward") predicts
10 F for separate (policy forward + recompute + backward, then all again for the KL step, the reference forward
twice) and 8 F for shared (one forward, two backward passes each with its recompute, one reference forward).

    DS_ACCELERATOR=cpu python benchmarks/bench_kl_forward_flops.py

Measured (torch 2.13 CPU): separate 9.58 F, shared 7.58 F per chunk; 4 F per policy chunk is an upper bound (layers
outside the checkpointed blocks are not recomputed, the first layer needs no input gradient), the difference is
exactly the forward and the reference forward that shared does not repeat.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the tests' in-process trainer builder


def train_phase_in_forwards(kl_forward: str, root: Path) -> tuple[float, int]:
    """(train-phase FLOPs / F, reference forwards seen) of one GRPO step under ``kl_forward``."""
    from tests.test_trainer_inprocess import build

    from deepgen_rl.model.tiny import save_tiny_deepgen

    paths = save_tiny_deepgen(root / "tiny", seed=0)
    trainer = build(paths, root / kl_forward, max_steps=2, optimizer_step_schedule="reference", kl_forward=kl_forward,
                    sftaux_coef=0.0, timestep_fraction=0.2, gradient_checkpointing=True)
    try:
        reference_flops, totals = [], []
        velocity, train_phase = trainer.reference.velocity, trainer.train_phase

        def counted_velocity(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = velocity(*args, **kwargs)
            reference_flops.append(counter.get_total_flops())
            return out

        def counted_train_phase(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = train_phase(*args, **kwargs)
            totals.append(counter.get_total_flops())
            return out

        trainer.reference.velocity, trainer.train_phase = counted_velocity, counted_train_phase
        trainer.training_step()
        forward = reference_flops[0]
        return totals[0] / forward, len(reference_flops)
    finally:
        trainer.close()


def main() -> None:
    import os

    import deepspeed

    from tests.trainer_utils import free_port

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="gloo")  # the one-rank group the in-process trainer expects
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("separate", "shared"):
            units, reference_calls = train_phase_in_forwards(mode, Path(folder))
            print(f"--kl_forward {mode:<8}: train phase = {units:.3f} F per chunk ({reference_calls} reference "
                  "forward(s))")


if __name__ == "__main__":
    main()
