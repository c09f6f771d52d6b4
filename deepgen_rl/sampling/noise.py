"""Per-sample noise streams: the noise a sample gets depends only on its own key, never on its neighbours.

A rollout that draws ``torch.randn((n, ...), generator=g)`` for a micro-batch gives row i whatever the shared
generator produced after the rows before it: the noise of a sample then depends on the rank it landed on, the
micro-batch size and how many ranks share the batch. ``SampleNoise`` gives each row its OWN generator (seeded by
the caller from the sample's global position, e.g. ``derive_seed(seed, purpose, step, global_index)``), so a row
draws the same numbers however the batch is split over ranks or micro-batches. Row i's draws are consumed in the
order the sampler asks for them (its initial noise, then one draw per SDE step), which is the same for every row.

Cost: one ``randn`` launch per row and draw instead of one per micro-batch; it does not grow with the world size.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


class SampleNoise:
    """One generator per row (``seeds[i]`` seeds row i), on ``device`` (the model's: no host-to-device copies)."""

    def __init__(self, seeds: Sequence[int], device: Union[str, torch.device]) -> None:
        self.device = torch.device(device)
        self.seeds = [int(seed) for seed in seeds]
        self.generators = []
        for seed in self.seeds:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self.generators.append(generator)

    @classmethod
    def _of(cls, generators: list[torch.Generator], seeds: list[int], device: torch.device) -> "SampleNoise":
        view = cls.__new__(cls)
        view.device, view.seeds, view.generators = device, seeds, generators
        return view

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows: slice) -> "SampleNoise":
        """The streams of ``rows`` (the same generator objects: drawing from the view advances them)."""
        return SampleNoise._of(self.generators[rows], self.seeds[rows], self.device)

    def randn(self, row_shape: Sequence[int]) -> Tensor:
        """[n, *row_shape] fp32 standard normal noise, row i from generator i, on ``device``."""
        return torch.stack([torch.randn(tuple(row_shape), generator=g, device=self.device, dtype=torch.float32)
                            for g in self.generators])

    def rand(self) -> Tensor:
        """[n] fp32 uniform U(0, 1), row i from generator i, on ``device``."""
        return torch.stack([torch.rand((), generator=g, device=self.device, dtype=torch.float32)
                            for g in self.generators])


NoiseSource = Union[torch.Generator, SampleNoise]  # a shared generator, or one stream per sample
