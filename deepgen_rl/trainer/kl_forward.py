"""The beta*KL optimizer step of ``--optimizer_step_schedule reference`` from the policy step's own forward.

Under ``reference`` with beta > 0 every trained timestep takes two AdamW steps: one on the policy term, one on
beta x KL (docs/algorithms.md, "The KL step's forward"). ``--kl_forward shared`` takes both gradients from ONE
chunk forward at the weights theta_0 the policy step starts from:

    g_kl = d(beta KL)/d theta at theta_0      (torch.autograd.grad, retain_graph; before the policy backward)
    g_pol = d(L_pol)/d theta at theta_0       (the engine's ordinary backward of the same graph)
    theta_1 = AdamW(theta_0, g_pol)           (the policy step)
    theta_2 = AdamW(theta_1, g_kl)            (the KL step: g_kl handed to the engine by ``inject_gradients``)

g_kl never enters the engine's gradient buffers before the policy step: ``torch.autograd.grad`` returns it without
accumulating into ``.grad``, so DeepSpeed's reduce hooks (they fire on accumulation) do not see it. Both backward
passes run before any weight moves, so a checkpointed block recomputed by the second one recomputes at theta_0 too.
Cost: the stash holds one gradient per trained parameter (the parameter's dtype) until the KL step.
``--kl_forward separate`` (the older behaviour) re-runs each chunk's forward under theta_1 instead.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def effective_kl_forward(requested: str, zero_stage: int, *, steps_on_kl: bool) -> str:
    """The mode the updater runs: ``shared`` needs whole parameters outside the forward to hand its stashed gradient
    back to the engine, which ZeRO-3 (parameters partitioned between forwards) does not give; it runs ``separate``.
    ``steps_on_kl``: the schedule takes a beta*KL step of its own (``reference`` with beta > 0); else nothing to
    warn about."""
    if requested == "shared" and zero_stage >= 3 and steps_on_kl:
        logger.warning("--kl_forward shared is not available under ZeRO-3 (it partitions the parameters between "
                       "forwards); the beta*KL step re-runs each chunk's forward (--kl_forward separate).")
    if zero_stage >= 3:
        return "separate"
    return requested


class KLGradientStash:
    """The beta*KL gradient of one trained timestep, summed over its chunks (one tensor per trained parameter,
    None where the KL does not reach it), taken from each chunk's graph before the policy backward frees it."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.grads: list[Optional[torch.Tensor]] = [None] * len(self.params)

    def add(self, kl_loss: torch.Tensor) -> None:
        """Accumulate d kl_loss / d params; the graph is retained for the policy backward that follows."""
        grads = torch.autograd.grad(kl_loss, self.params, retain_graph=True, allow_unused=True)
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            if self.grads[i] is None:
                self.grads[i] = grad
            else:
                self.grads[i].add_(grad)

    def loss(self) -> torch.Tensor:
        """A scalar 0 whose backward delivers exactly the stashed gradients (times the incoming gradient: 1, or the
        engine's loss scale) to their parameters, so the KL step goes through the engine's own backward/step."""
        pairs = [(p, g) for p, g in zip(self.params, self.grads) if g is not None]
        if not pairs:
            raise RuntimeError("the beta*KL term reaches no trained parameter: nothing to step on")
        params, grads = zip(*pairs)
        return _InjectGradients.apply(grads, *params)


class _InjectGradients(torch.autograd.Function):
    """forward(grads, *params) -> 0; backward hands ``grads`` (scaled by the output gradient) to ``params``."""

    @staticmethod
    def forward(ctx, grads, *params):  # noqa: ARG004 - params only link the output to the leaves
        ctx.grads = grads
        return params[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None  # one backward only: release the stash with the graph
        scale = grad_output.item()
        return (None, *(g if scale == 1.0 else g * scale for g in grads))
