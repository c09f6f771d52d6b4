"""The sharded EMA (``--ema_device gpu``, trainer/ema_shards.py) on real DeepSpeed ZeRO-2 and ZeRO-3 engines of a tiny
bf16 module, one rank of a torchrun run (gloo, DS_ACCELERATOR=cpu):

    torchrun --nproc_per_node 2 tests/scripts/ema_shards_run.py --out DIR

For each stage: STEPS AdamW steps on a fixed loss with the EMA stepped after each; after every step the test's own
reference, a float64 lerp of the GATHERED fp32 master weights (DeepSpeed's ``safe_get_full_fp32_param``), advances
too. At step RESUME_AT the EMA is saved (``state_dict``: rank 0 writes DIR/ema_zero{stage}.pt) and a second EMA is
loaded from that file; both then follow the same master weights. Each rank writes
DIR/result_zero{stage}_rank{r}.pt (whole EMA, reference, the resumed EMA right after loading and at the end, what the
model held inside ``applied_to`` and after it) for tests/test_ema.py to assert on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

STEPS = 5
RESUME_AT = 2  # the EMA is saved after this step (0-based) and a second one resumes from the file
DECAY = 0.6  # d_eff = 0.1, 2/11, 3/12, 4/13, 5/14: the warm-up, below the cap


class TinyNet(nn.Module):
    """Odd sizes so that parameters straddle the ranks' partitions and need padding; one frozen layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(7, 13)
        self.mid = nn.Linear(13, 11)
        self.norm = nn.LayerNorm(11)
        self.frozen = nn.Linear(11, 5)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.norm(self.mid(torch.tanh(self.inp(x)))))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().to(torch.bfloat16)


def engine_for(model: nn.Module, stage: int):
    """A DeepSpeed engine of ``model`` (bf16, ZeRO ``stage``, torch AdamW over its trainable parameters in the
    trainer's two groups: matrices, 1-D tensors). ZeRO-3: sub-groups of ~40 elements per rank (two for the matrices) and the
    biases kept gathered (persistent), the cases its partition map and swap must handle."""
    import deepspeed

    from deepgen_rl.trainer.deepspeed_setup import trainable_parameter_groups

    zero3 = {"sub_group_size": 40, "stage3_param_persistence_threshold": 20}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage, **(zero3 if stage == 3 else {})},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(trainable_parameter_groups(model, weight_decay=0.01), lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def gathered_params(engine, stage: int) -> dict[str, torch.Tensor]:
    """The model's trained 16-bit weights, whole (gathered under ZeRO-3; collective)."""
    import deepspeed

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        return {n: p.detach().clone().cpu() for n, p in params}


def run_stage(stage: int, out: Path, rank: int) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from deepgen_rl.model.safe_load import load_weights_only
    from deepgen_rl.trainer.ema_shards import ShardedEMA

    engine = engine_for(tiny_net(), stage)
    model = engine.module
    ema = ShardedEMA(engine.optimizer, model, decay=DECAY)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def masters() -> dict[str, torch.Tensor]:
        return {n: safe_get_full_fp32_param(p).detach().cpu().double() for n, p in trained}

    reference = masters()
    generator = torch.Generator().manual_seed(100 + rank)
    resumed = None
    for s in range(STEPS):
        x = torch.randn(3, 7, generator=generator).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        assert ema.step()
        d = min((1 + s) / (10 + s), DECAY)
        reference = {n: d * reference[n] + (1 - d) * m for n, m in masters().items()}
        if resumed is not None:
            resumed.step()
        if s == RESUME_AT:
            state = ema.state_dict()
            path = out / f"ema_zero{stage}.pt"
            if rank == 0:
                torch.save(state, path)
            torch.distributed.barrier()
            resumed = ShardedEMA(engine.optimizer, model, decay=DECAY)
            resumed.load_state_dict(load_weights_only(path, source="test"), str(path))
            loaded = resumed.full_shadow()
    live = gathered_params(engine, stage)
    with ema.applied_to(model):
        inside = gathered_params(engine, stage)
        # a forward inside sees the EMA (ZeRO-3 gathers it on demand)
        engine.eval()
        with torch.no_grad():
            forward = model(torch.ones(1, 7, dtype=torch.bfloat16)).float().cpu()
    after = gathered_params(engine, stage)
    torch.save({"world": torch.distributed.get_world_size(), "full": ema.full_shadow(),
                "full_rank0_only": ema.full_shadow(dst=0), "reference": reference,
                "loaded": loaded, "resumed_full": resumed.full_shadow(), "resumed_updates": resumed.num_updates,
                "live": live, "inside": inside,
                "after": after, "forward_inside": forward, "shard_numel": sum(t.numel() for t in ema.shards),
                "partitions": len(ema.shards),
                "optimizer_steps": ema.optimizer_steps, "num_updates": ema.num_updates},
               out / f"result_zero{stage}_rank{rank}.pt")


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    for stage in (2, 3):
        run_stage(stage, Path(args.out), rank)


if __name__ == "__main__":
    main()
