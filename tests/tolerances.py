"""Tolerances for comparing the same float32 computation run by two model instances (or under two thread counts).

WHY not bit for bit: the kernel a matmul, convolution or reduction takes (its blocking, its vector width, how it
splits the work between threads) depends on the thread count and on the memory alignment of the tensors, so two
instances holding the same weights may add the same terms in another order. A test passed with one thread and
failed with two on a 2-core AMD EPYC machine because it compared two instances with ``torch.equal``.

The bound (Higham, "Accuracy and Stability of Numerical Algorithms", section 3.1): a sum of K float32 terms, in any
order, is within gamma_K ~= K * u of the exact sum, relative to the sum of the terms' absolute values (u = 2**-24,
float32's unit roundoff). Two orders therefore differ by at most ~2 K u of that scale. A network of D reductions in
sequence (each matmul, attention product, norm) adds one such error per reduction, carried forward about unchanged
by the (contractive or residual) layers after it, so the outputs of two instances differ by at most ~2 D K_max u
relative to the outputs' scale. The result is a worst case: the measured spread is usually 0 or a few ulps.
"""

from __future__ import annotations

import torch

FP32_UNIT_ROUNDOFF = 2.0 ** -24


def reordering_tolerance(reductions: int, longest: int) -> float:
    """Relative bound ``2 * reductions * longest * u`` on the difference between two evaluation orders of a float32
    network with ``reductions`` sequential reductions, the longest summing ``longest`` terms."""
    return 2.0 * reductions * longest * FP32_UNIT_ROUNDOFF


def assert_close_up_to_reordering(actual: torch.Tensor, expected: torch.Tensor, *, reductions: int,
                                  longest: int) -> None:
    """``actual`` equals ``expected`` up to :func:`reordering_tolerance`, relative to ``expected``'s largest |value|
    (the scale the summed terms have: an element near 0 can carry the rounding of larger terms)."""
    tol = reordering_tolerance(reductions, longest)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30))
