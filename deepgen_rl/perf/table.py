"""Predicted seconds per GRPO step and images/s/GPU on 1..16 nodes: the table and its plot.

The model (documented in docs/compute.md), per rank:

    seconds = FLOPs / (peak x MFU) + bytes sent / bandwidth

with FLOPs from step_flops.py (independent of the node count: the per-rank batch is held fixed, so the global
batch grows with the nodes), bytes from comm.py at W = nodes x GPUs per node, and the bandwidth the intra-node
one on a single node, else the inter-node one per GPU (a ring crossing nodes runs at its slowest link).
Communication is not assumed to overlap compute (DeepSpeed's overlap_comm hides part of it: a bound), reward
servers and host work are not modelled. images/s/GPU = N / seconds (N images per rank per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

NODES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Hardware:
    """peak_tflops: dense bf16 TFLOP/s of one GPU; mfu: the share of it the step's FLOPs run at; *_gbps: GB/s
    (gigaBYTES) each GPU sends at inside a node / across nodes."""

    peak_tflops: float
    mfu: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int = 8

    def bandwidth(self, nodes: int) -> float:
        """Bytes per second one rank sends at."""
        return 1e9 * (self.intra_node_gbps if nodes == 1 else self.inter_node_gbps)


@dataclass(frozen=True)
class ScalingRow:
    nodes: int
    world_size: int
    compute_s: float
    comm_bytes: float
    comm_s: float
    images_per_rank: int

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def images_per_s_per_gpu(self) -> float:
        return self.images_per_rank / self.seconds


def predict(flops: float, comm_bytes: float, images_per_rank: int, nodes: int, hw: Hardware) -> ScalingRow:
    """One row of the table: ``flops`` and ``comm_bytes`` of one rank's step."""
    compute = flops / (hw.peak_tflops * 1e12 * hw.mfu)
    return ScalingRow(nodes=nodes, world_size=nodes * hw.gpus_per_node, compute_s=compute, comm_bytes=comm_bytes,
                      comm_s=comm_bytes / hw.bandwidth(nodes), images_per_rank=images_per_rank)


def scaling_rows(flops: float, comm_bytes_at: Callable[[int], float], images_per_rank: int, hw: Hardware,
                 nodes: Sequence[int] = NODES) -> list[ScalingRow]:
    """The table's rows; ``comm_bytes_at(world_size)``: one rank's bytes per step at that world size."""
    return [predict(flops, comm_bytes_at(n * hw.gpus_per_node), images_per_rank, n, hw) for n in nodes]


def format_table(rows_by_schedule: dict[str, list[ScalingRow]], hw: Hardware) -> str:
    lines = [f"predicted seconds per GRPO step (compute at {hw.peak_tflops:g} TFLOP/s x MFU {hw.mfu:g}; "
             f"{hw.intra_node_gbps:g} GB/s per GPU in a node, {hw.inter_node_gbps:g} GB/s per GPU across nodes; "
             f"{hw.gpus_per_node} GPUs per node, per-rank batch fixed)"]
    header = f"  {'schedule':<21} {'NNODES':>6} {'GPUs':>5} {'compute s':>10} {'GB sent/rank':>13} {'comm s':>8} " \
             f"{'s/step':>8} {'img/s/GPU':>10}"
    lines.append(header)
    for schedule, rows in rows_by_schedule.items():
        for row in rows:
            lines.append(f"  {schedule:<21} {row.nodes:>6} {row.world_size:>5} {row.compute_s:>10.1f} "
                         f"{row.comm_bytes / 1e9:>13.1f} {row.comm_s:>8.2f} {row.seconds:>8.1f} "
                         f"{row.images_per_s_per_gpu:>10.3f}")
    return "\n".join(lines)


def plot_rows(rows_by_schedule: dict[str, list[ScalingRow]], hw: Hardware, path: str | Path) -> Path:
    """The table as a PNG (matplotlib, Agg): s/step and images/s/GPU against the node count, one line per
    schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for schedule, rows in rows_by_schedule.items():
        nodes = [r.nodes for r in rows]
        left.plot(nodes, [r.seconds for r in rows], marker="o", label=schedule)
        right.plot(nodes, [r.images_per_s_per_gpu for r in rows], marker="o", label=schedule)
    for axis, label in ((left, "seconds per GRPO step"), (right, "images / s / GPU")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(NODES), [str(n) for n in NODES])
        axis.set_xlabel(f"NNODES (x {hw.gpus_per_node} GPUs)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    left.legend(title="--optimizer_step_schedule")
    figure.suptitle(f"predicted at {hw.peak_tflops:g} TFLOP/s x MFU {hw.mfu:g}, {hw.intra_node_gbps:g} / "
                    f"{hw.inter_node_gbps:g} GB/s per GPU intra / inter node", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
