"""EMA update cost per optimizer step: the sharded EMA (``--ema_device gpu``) vs the whole host copy (``cpu``).

Both sides average the same parameters: the SD3.5-Medium DiT's (2.24 B, their real shapes from the published
config on the meta device), or the first of them adding up to ``--scale`` of that (both sides scaled alike).

* host copy (the code of ``--ema_device cpu``, trainer/ema.py ``EMA.step`` itself): for each bf16 parameter, a copy
  to the host as fp32, then a lerp into its fp32 host shadow. On a GPU the copy also crosses PCIe; here (CPU only)
  it is the bf16 -> fp32 conversion, so the measured ratio understates the GPU gain.
* sharded (what trainer/ema_shards.py ``ShardedEMA.step`` runs): one ``torch._foreach_lerp_`` over a rank's fp32
  master partitions at world size ``--world_size``: one flat tensor per AdamW group (matrices with weight decay,
  1-D tensors without), each 1 / world_size of the group, as DeepSpeed's ZeRO-2 lays them out.

Repeats are interleaved (host, sharded, sharded, host, ...), each timed in process CPU time on one thread (wall time
printed too); the ratio is the median of per-repeat ratios of CPU times.

    python benchmarks/bench_ema.py               # prints `ratio: <sharded/host>` (target <= 1/6 at world size 8)
    python benchmarks/bench_ema.py --scale 1     # the full 2.24 B (needs ~14 GiB of host memory)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from deepgen_rl.trainer.ema import EMA

DECAY = 0.99


def dit_shapes() -> list[tuple[int, ...]]:
    """The SD3.5-Medium DiT's parameter shapes (its published config, built on the meta device)."""
    from diffusers import SD3Transformer2DModel

    from deepgen_rl.model.published_configs import SD35M_KONTEXT_TRANSFORMER_CONFIG

    with torch.device("meta"):
        dit = SD3Transformer2DModel.from_config(SD35M_KONTEXT_TRANSFORMER_CONFIG)
    return [tuple(p.shape) for p in dit.parameters()]


def first_fraction(shapes: list[tuple[int, ...]], scale: float) -> list[tuple[int, ...]]:
    """The leading shapes adding up to ``scale`` of all elements (at least one)."""
    total, kept, count = sum(torch.Size(s).numel() for s in shapes), [], 0
    for shape in shapes:
        if kept and count >= scale * total:
            break
        kept.append(shape)
        count += torch.Size(shape).numel()
    return kept


def host_side(shapes: list[tuple[int, ...]]) -> tuple[nn.Module, EMA]:
    model = nn.ParameterList([nn.Parameter(torch.full(s, 0.5, dtype=torch.bfloat16)) for s in shapes])
    return model, EMA(model, decay=DECAY)


def sharded_side(shapes: list[tuple[int, ...]], world_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA partitions, fp32 master partitions): one per AdamW group, 1 / world_size of its elements each."""
    groups = [sum(torch.Size(s).numel() for s in shapes if len(s) >= 2),
              sum(torch.Size(s).numel() for s in shapes if len(s) < 2)]
    sizes = [-(-n // world_size) for n in groups if n]
    return [torch.full((n,), 0.25) for n in sizes], [torch.full((n,), 0.5) for n in sizes]


def seconds(fn) -> tuple[float, float]:
    """(process CPU time, wall time) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25, help="Share of the 2.24 B parameters on both sides.")
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    shapes = first_fraction(dit_shapes(), args.scale)
    numel = sum(torch.Size(s).numel() for s in shapes)
    model, host = host_side(shapes)
    shards, masters = sharded_side(shapes, args.world_size)
    print(f"{len(shapes)} DiT parameters, {numel / 1e9:.3f} B elements (scale {args.scale:g} of the DiT); "
          f"sharded: {sum(t.numel() for t in shards) / 1e6:.1f} M fp32 elements in {len(shards)} partitions "
          f"(world size {args.world_size})")

    def host_update():
        host.step(model)

    def sharded_update():
        torch._foreach_lerp_(shards, masters, 1.0 - DECAY)

    host_update(), sharded_update()  # warm-up
    runs = []
    for r in range(args.repeats):
        order = (host_update, sharded_update) if r % 2 == 0 else (sharded_update, host_update)
        runs.append({fn: seconds(fn) for fn in order})
    for k, clock in enumerate(("CPU", "wall")):
        host_s = statistics.median(run[host_update][k] for run in runs)
        shard_s = statistics.median(run[sharded_update][k] for run in runs)
        ratio = statistics.median(run[sharded_update][k] / run[host_update][k] for run in runs)
        print(f"{clock} time per update: host copy {host_s:.3f} s, sharded {shard_s:.4f} s, ratio {ratio:.4f}")
    ratio = statistics.median(run[sharded_update][0] / run[host_update][0] for run in runs)
    print(f"ratio: {ratio:.4f}  (CPU time; target <= {1 / 6:.4f})")


if __name__ == "__main__":
    main()
