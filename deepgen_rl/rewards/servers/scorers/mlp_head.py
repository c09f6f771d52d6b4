"""The linear MLP head shared by the LAION improved aesthetic predictor and ImageReward.

Published layout (both): ``layers.{0,2,4,6,7}.{weight,bias}``, Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1
with Dropout at indices 1, 3, 5 and NO activation between them (so at eval it is one affine map, kept layered
to load the published keys). The widths are read from the tensors, so a tiny head of the same layout loads too.
"""

from __future__ import annotations

import torch
from torch import nn

from deepgen_rl.rewards.servers.scorers.checkpoints import StateDict, load_exactly


class LinearHead(nn.Module):
    """features [n, D] -> scores [n]."""

    def __init__(self, linear_at: dict[int, tuple[int, int]]) -> None:
        super().__init__()
        # Identity where the published model has Dropout (no weights): the indices of the Linear keys stay put.
        self.layers = nn.Sequential(*[nn.Linear(*linear_at[i]) if i in linear_at else nn.Identity()
                                      for i in range(max(linear_at) + 1)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def head_shapes(state: StateDict, source: str) -> dict[int, tuple[int, int]]:
    """{index: (in, out)} of the head's Linear layers, read from its ``layers.{i}.weight`` tensors and checked."""
    shapes = {int(key.split(".")[1]): tuple(value.shape) for key, value in state.items()
              if key.startswith("layers.") and key.endswith(".weight")}
    if not shapes:
        raise ValueError(f"{source}: no 'layers.<i>.weight' tensors (expected the MLP head's published layout).")
    order = sorted(shapes)
    for before, after in zip(order, order[1:]):
        if shapes[before][0] != shapes[after][1]:
            raise ValueError(f"{source}: layers.{before} outputs {shapes[before][0]} but layers.{after} takes "
                             f"{shapes[after][1]}.")
    if shapes[order[-1]][0] != 1:
        raise ValueError(f"{source}: the last layer (layers.{order[-1]}) must output 1 score, not {shapes[order[-1]][0]}.")
    return {i: (shape[1], shape[0]) for i, shape in shapes.items()}


def head_from_state_dict(state: StateDict, source: str) -> LinearHead:
    """Build the head from ``layers.{i}.weight/bias`` tensors (other keys are the caller's) and load them."""
    head = LinearHead(head_shapes(state, source))
    load_exactly(head, {k: v for k, v in state.items() if k.startswith("layers.")}, source)
    return head.eval()
