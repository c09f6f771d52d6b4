"""``--ema_device gpu``: the EMA sharded beside each rank's fp32 master partition (ZeRO-2/3).

DeepSpeed's ZeRO optimizer keeps, per parameter group g, one flat fp32 tensor M_g [P_g] on each rank: the part of
the master weights this rank updates. The EMA keeps one fp32 tensor E_g [P_g] beside it (same device: the GPU, or the
CPU when the optimizer is offloaded) and after each applied optimizer step updates every group with ONE fused
``torch._foreach_lerp_(E, M, 1 - d)``: a rank averages only what it owns, from the fp32 master weights (the host
copy averages the 16-bit ones). Memory: 4 bytes x trained parameters / world size per rank.

How a partition maps to parameters (DeepSpeed 0.19.8):

* ZeRO-2 (``stage_1_and_2.py``; also ZeRO-1, but not in bf16, where DeepSpeed uses its BF16_Optimizer): the
  group's parameters lie end to end in a flat buffer F (``bit16_groups_flat``; parameter j at
  ``round_robin_bit16_offsets[g][j]``, alignment padding between them and at the end), cut into world-size equal
  partitions; rank r's fp32 partition ``single_partition_of_fp32_groups[g]`` is F[r P, (r+1) P).
* ZeRO-3 (``stage3.py``): every parameter is split on its own: rank r holds elements [r p_j, (r+1) p_j) of
  parameter j's flattened values (p_j = ``partition_numel()``, zero-padded past its numel); the sub-group's fp32
  partition ``fp32_partitioned_groups_flat[g]`` is those slices of its parameters end to end.

Whole tensors (state-dict names and shapes, the ``ema.pt`` format of the host copy) are built only to save
(``state_dict``, rank 0) and for tests (``full_shadow``), gathered in bounded chunks; loading slices this rank's
partition out of whole tensors, so a resume may change the world size. Evaluation and sample grids gather no fp32:
``applied_to`` writes the EMA (cast) into this rank's 16-bit partition and lets DeepSpeed's own all-gather
(ZeRO-2: the 16-bit all-gather of every optimizer step) or on-demand gathers (ZeRO-3) spread it, then restores the
saved partition exactly.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from deepgen_rl.config import EMA_DEVICES

from .ema import EMA, EmaCounters, saved_shadow

# Elements of one rank's piece in each all-gather of a whole-tensor gather: 64 MiB fp32 per rank.
GATHER_CHUNK = 1 << 24


@dataclass(frozen=True)
class ShardEntry:
    """One parameter in a group's partitions. ``offset``: ZeRO-1/2 its start in the flat buffer F (all ranks'
    partitions end to end); ZeRO-3 its start in every rank's partition. ``part_numel``: ZeRO-3 its per-rank slice
    p_j (0 under ZeRO-1/2, where parameters are not split one by one)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    part_numel: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GroupLayout:
    """A group's partitions: P = ``partition_numel`` elements per rank; ``per_parameter``: the ZeRO-3 layout."""

    partition_numel: int
    entries: tuple[ShardEntry, ...]  # sorted by offset
    per_parameter: bool

    def overlaps(self, rank: int, lo: int, hi: int) -> Iterator[tuple[ShardEntry, int, int, int]]:
        """(entry, start in rank's partition, start in the entry's flattened values, length) of each run of
        elements of partition positions [lo, hi) of ``rank`` that belong to a parameter (padding skipped)."""
        starts = [e.offset for e in self.entries]
        if self.per_parameter:
            first = max(bisect.bisect_right(starts, lo) - 1, 0)
            for entry in self.entries[first:]:
                if entry.offset >= hi:
                    break
                valid = min(entry.part_numel, entry.numel - rank * entry.part_numel)  # the rest is padding
                a, b = max(lo, entry.offset), min(hi, entry.offset + valid)
                if a < b:
                    yield entry, a, rank * entry.part_numel + a - entry.offset, b - a
            return
        base = rank * self.partition_numel  # partition position q is flat position base + q
        first = max(bisect.bisect_right(starts, base + lo) - 1, 0)
        for entry in self.entries[first:]:
            if entry.offset >= base + hi:
                break
            a, b = max(base + lo, entry.offset), min(base + hi, entry.offset + entry.numel)
            if a < b:
                yield entry, a - base, a - entry.offset, b - a


def partition_of(whole: dict[str, torch.Tensor], layout: GroupLayout, rank: int) -> torch.Tensor:
    """Rank ``rank``'s partition [P] (fp32, CPU; padding 0) of the whole tensors ``whole`` {name: tensor}."""
    part = torch.zeros(layout.partition_numel, dtype=torch.float32)
    for entry, start, src, length in layout.overlaps(rank, 0, layout.partition_numel):
        part[start:start + length] = whole[entry.name].reshape(-1)[src:src + length].float()
    return part


def place_piece(out: dict[str, torch.Tensor], layout: GroupLayout, rank: int, lo: int, piece: torch.Tensor) -> None:
    """Write ``piece`` = rank ``rank``'s partition positions [lo, lo + len) into the flat whole tensors ``out``
    {name: 1-D tensor of numel}."""
    for entry, start, dst, length in layout.overlaps(rank, lo, lo + piece.numel()):
        out[entry.name][dst:dst + length] = piece[start - lo:start - lo + length]


# ----- DeepSpeed's partitions ------------------------------------------------------------------------------------

def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def zero_layouts(optimizer, model: torch.nn.Module) -> tuple[int, list[GroupLayout]]:
    """(ZeRO stage family 2 or 3, one layout per group of the optimizer's fp32 master partitions)."""
    from deepspeed import comm as dist

    names = _names(model)
    layouts = []
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        for g, master in enumerate(optimizer.single_partition_of_fp32_groups):
            world = dist.get_world_size(group=optimizer.real_dp_process_group[g])
            if optimizer.bit16_groups_flat[g].numel() != master.numel() * world:
                raise RuntimeError(f"ZeRO group {g}: the flat buffer is not {world} partitions of {master.numel()}.")
            entries = [ShardEntry(names[id(p)], tuple(meta.shape), int(offset)) for p, meta, offset in zip(
                optimizer.round_robin_bit16_groups[g], optimizer.round_robin_bit16_meta[g],
                optimizer.round_robin_bit16_offsets[g])]
            layouts.append(GroupLayout(master.numel(), tuple(sorted(entries, key=lambda e: e.offset)), False))
        return 2, layouts
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for g, master in enumerate(optimizer.fp32_partitioned_groups_flat):
            entries, offset = [], 0
            for p in optimizer.fp16_groups[g]:
                entries.append(ShardEntry(names[id(p)], tuple(p.ds_shape), offset, int(p.partition_numel())))
                offset += int(p.partition_numel())
            if master.numel() != offset or optimizer.fp16_partitioned_groups_flat[g] is None:
                raise ValueError("--ema_device gpu needs the fp32 master partitions in memory; this ZeRO-3 set-up "
                                 "keeps them elsewhere (NVMe offload): use a config without NVMe offload.")
            layouts.append(GroupLayout(master.numel(), tuple(entries), True))
        return 3, layouts
    raise ValueError(f"--ema_device gpu shards the EMA beside ZeRO's fp32 master partitions, but the engine's "
                     f"optimizer is {type(optimizer).__name__}, which keeps none (no ZeRO, or bf16 ZeRO-1): use a "
                     "ZeRO-2/3 --deepspeed config (scripts/deepspeed/zero2.json) or --ema_device cpu.")


class ShardedEMA(EmaCounters):
    """fp32 EMA partitions ``shards[g]`` [P_g] beside the ZeRO optimizer's fp32 master partitions (this rank's)."""

    def __init__(self, optimizer, model: torch.nn.Module, *, decay: float, update_every: int = 1):
        super().__init__(decay=decay, update_every=update_every)
        self.optimizer = optimizer
        self.device = "gpu"
        self.collective = True  # applied_to, full_shadow and state_dict: every rank calls them together
        self.stage, self.layouts = zero_layouts(optimizer, model)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        averaged = {e.name for layout in self.layouts for e in layout.entries}
        if not averaged:
            raise ValueError("--ema_decay > 0 but the model has no trainable parameters to average.")
        if averaged != trained:
            raise RuntimeError(f"the ZeRO optimizer's partitions hold other parameters than the trained ones "
                               f"({sorted(averaged ^ trained)[:5]}).")
        self.shapes = {e.name: e.shape for layout in self.layouts for e in layout.entries}
        self.shards: list[torch.Tensor] = []
        self.reset()

    # ----- DeepSpeed's tensors (read each time: a checkpoint load may rebind them) -----

    def _masters(self) -> list[torch.Tensor]:
        groups = (self.optimizer.single_partition_of_fp32_groups if self.stage == 2
                  else self.optimizer.fp32_partitioned_groups_flat)
        return [m.detach() if m.dtype == torch.float32 else m.detach().float() for m in groups]

    def _groups(self) -> list:
        return (self.optimizer.real_dp_process_group if self.stage == 2
                else self.optimizer.sub_group_process_groups)

    def _rank(self, g: int) -> int:
        from deepspeed import comm as dist

        return dist.get_rank(group=self._groups()[g])

    # ----- the average -----

    @torch.no_grad()
    def reset(self, model: Optional[torch.nn.Module] = None) -> None:
        """Start the average at the current fp32 master weights (counters kept); ``model`` is not needed."""
        self.shards = [m.to(torch.float32, copy=True) for m in self._masters()]

    @torch.no_grad()
    def step(self, model: Optional[torch.nn.Module] = None) -> bool:
        """Call right after each applied optimizer step (``model`` is not read: the masters are the optimizer's);
        returns whether this step updated the average."""
        d = self._advance()
        if d is None:
            return False
        # e <- e + (1 - d)(m - e) = d e + (1 - d) m on every group at once: one fused kernel launch per device.
        torch._foreach_lerp_(self.shards, self._masters(), 1.0 - d)
        return True

    # ----- whole tensors: save, load (any world size), tests -----

    @torch.no_grad()
    def full_shadow(self, dst: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Collective: {state-dict name: whole fp32 EMA on the CPU}, gathered in chunks of GATHER_CHUNK elements per
        rank. ``dst``: only that rank assembles it (the others return {}); None: every rank."""
        from deepspeed import comm as dist
        from deepspeed.accelerator import get_accelerator

        comm_device = torch.device(get_accelerator().current_device_name())
        me = dist.get_rank()
        keep = dst is None or me == dst
        flat = {name: torch.empty(math.prod(shape), dtype=torch.float32) for name, shape in self.shapes.items()} \
            if keep else {}
        for g, (layout, shard) in enumerate(zip(self.layouts, self.shards)):
            group = self._groups()[g]
            world = dist.get_world_size(group=group)
            for lo in range(0, layout.partition_numel, GATHER_CHUNK):
                mine = shard[lo:lo + GATHER_CHUNK].to(comm_device).contiguous()
                pieces = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(pieces, mine, group=group)
                if keep:
                    for rank, piece in enumerate(pieces):
                        place_piece(flat, layout, rank, lo, piece.cpu())
        return {name: t.view(self.shapes[name]) for name, t in flat.items()}

    def state_dict(self) -> Optional[dict]:
        """Collective: on rank 0 the ``ema.pt`` state (whole CPU tensors and numbers, the host copy's format:
        weights-only loadable, any world size can resume it); None on the other ranks."""
        from deepspeed import comm as dist

        shadow = self.full_shadow(dst=0)
        return {"shadow": shadow, **self._counters_state()} if dist.get_rank() == 0 else None

    @torch.no_grad()
    def load_state_dict(self, state: dict, source: str) -> None:
        """Restore a saved EMA (whole tensors: from any world size or ``--ema_device``): this rank keeps its slices."""
        shadow = saved_shadow(state, source, self.shapes)
        for g, layout in enumerate(self.layouts):
            self.shards[g].copy_(partition_of(shadow, layout, self._rank(g)))
        self._load_counters(state, source)

    # ----- evaluation and sample grids -----

    @contextlib.contextmanager
    def applied_to(self, model: Optional[torch.nn.Module] = None) -> Iterator[None]:
        """Inside, the trained parameters hold the EMA (cast to their dtype); afterwards this rank's 16-bit partition
        is restored from a copy (1/world of the weights) and re-spread, so the live weights come back bit for bit,
        even when the body raises. Collective (every rank enters it)."""
        parts = self._lp_partitions()
        with torch.no_grad():
            backup = [p.clone() for p in parts]
        try:
            with torch.no_grad():
                self._write_lp(parts, self.shards)
            yield
        finally:
            with torch.no_grad():
                self._write_lp(parts, backup)

    def _lp_partitions(self) -> list[torch.Tensor]:
        """This rank's 16-bit partitions, group by group (what the forward reads after a gather)."""
        opt = self.optimizer
        if self.stage == 2:
            return [opt.parallel_partitioned_bit16_groups[g][self._rank(g)] for g in range(len(self.layouts))]
        return list(opt.fp16_partitioned_groups_flat)

    def _write_lp(self, parts: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        opt = self.optimizer
        if self.stage == 3:  # release every gathered copy first (DeepSpeed's own step does so)
            opt._partition_all_parameters()
        for part, value in zip(parts, values):
            part.copy_(value.to(part.device, part.dtype))
        if self.stage == 2:  # what DeepSpeed's step does after updating the partitions
            from deepspeed.runtime.utils import all_gather_dp_groups

            all_gather_dp_groups(groups_flat=opt.bit16_groups_flat,
                                 partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                                 dp_process_group=opt.real_dp_process_group,
                                 start_alignment_factor=opt.nccl_start_alignment_factor,
                                 allgather_bucket_size=opt.allgather_bucket_size)
        elif opt.persistent_parameters:  # small parameters ZeRO-3 keeps gathered: gathered again (its _post_step)
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


def ema_from_args(model: torch.nn.Module, args, engine=None) -> Optional[EmaCounters]:
    """The EMA of ``model``'s trainable parameters, or None when --ema_decay is 0: ``--ema_device gpu`` sharded
    beside ``engine``'s fp32 master partition (``ShardedEMA``), ``cpu`` the host copy (``EMA``)."""
    if not args.ema_decay:
        return None
    if args.ema_device not in EMA_DEVICES:
        raise ValueError(f"--ema_device must be one of {', '.join(EMA_DEVICES)}; got {args.ema_device!r}.")
    if args.ema_device == "gpu":
        return ShardedEMA(engine.optimizer, model, decay=args.ema_decay, update_every=args.ema_update_every)
    return EMA(model, decay=args.ema_decay, update_every=args.ema_update_every)
