"""A real training run (grpo_deepgen's parts, under torchrun) whose steps from the second on outlast torchrun's
default 30 s shutdown grace: every training chunk of those steps first sleeps --chunk_sleep seconds.

    torchrun --nproc_per_node 2 tests/scripts/slow_step_run.py --chunk_sleep 15 --marker M <grpo_deepgen flags>

Rank 0 creates the file --marker when the first slow chunk starts, so a test knows the run is inside step 2
and can send SIGTERM to torchrun then.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer_utils import _pop_flag  # noqa: E402


def main(argv: list[str]) -> int:
    argv, chunk_sleep = _pop_flag(argv, "--chunk_sleep")
    argv, marker = _pop_flag(argv, "--marker")
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.config import parse_args
    from deepgen_rl.trainer import grpo_trainer

    args, *groups = parse_args(argv)
    device = grpo_deepgen._init_distributed()
    grpo_deepgen._setup_logging(int(os.environ.get("RANK", "0")))
    trainer = grpo_deepgen.build_trainer(args, *groups, device)
    real_objective = grpo_trainer.policy_chunk_objective

    def slow_objective(*args, **kwargs):
        if trainer.state.global_step >= 1:
            if trainer.rank == 0 and marker and not Path(marker).exists():
                Path(marker).write_text("step 2 training")
            time.sleep(float(chunk_sleep))
        return real_objective(*args, **kwargs)

    grpo_trainer.policy_chunk_objective = slow_objective
    try:
        trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"worker exited cleanly at step {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
