"""The checks and counts the flags validate with: SDE noise level, step count, and how many steps a rollout trains.

Pure functions of plain numbers, below both ``config`` (which validates the flags with them) and ``sampling`` /
``rl`` (which call them on every rollout and draw): docs/algorithms.md#trained-timesteps. ``rl.timesteps`` draws
the trained steps; these say how many and within which window.
"""

from __future__ import annotations


def check_sde_eta(eta: float) -> None:
    """--sde_eta in (0, 1] (GRPOConfig and every SDE rollout): at 0 a step has no noise, so no log-prob to learn."""
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"--sde_eta must be in (0, 1]; got {eta}.")


def check_sde_steps(num_inference_steps: int) -> None:
    """An SDE rollout is trained on all but its last step (s' = 0 there), so it needs T >= 2 (GRPOConfig, the
    trained-step count and every SDE rollout); ODE generation for evaluation needs only T >= 1."""
    if num_inference_steps < 2:
        raise ValueError(f"--num_inference_steps must be >= 2 (the last step is never trained); got "
                         f"{num_inference_steps}.")


def num_train_steps(num_inference_steps: int, timestep_fraction: float) -> int:
    """int(T * timestep_fraction), at least 1 and at most T - 1: the one rule (GRPOConfig.num_train_timesteps, the
    batch plan and the trainer's draw all use it), with its bounds T >= 2 and fraction in (0, 1]."""
    check_sde_steps(num_inference_steps)
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"--timestep_fraction must be in (0, 1]; got {timestep_fraction}.")
    return max(1, min(int(num_inference_steps * timestep_fraction), num_inference_steps - 1))


def sde_window_range(num_inference_steps: int, window_size: int, window_range: str | None) -> tuple[int, int]:
    """(a, b) of --sde_window_range "a,b" (None: 0,T), checked against --sde_window_size W and T: 0 <= a,
    a + W <= b <= T, and W >= 2 when b == T (a window holding the last step, never trained, keeps W - 1)."""
    if window_size < 1 or window_size > num_inference_steps:
        raise ValueError(f"--sde_window_size must be in 1..--num_inference_steps ({num_inference_steps}) when on "
                         f"(0 turns the window off); got {window_size}.")
    if window_range is None or not str(window_range).strip():
        low, high = 0, num_inference_steps
    else:
        try:
            low, high = (int(part) for part in str(window_range).split(","))
        except ValueError:
            raise ValueError(f"--sde_window_range must be two step indices 'a,b' (e.g. 0,25); got "
                             f"{window_range!r}.") from None
    if not 0 <= low < high <= num_inference_steps or high - low < window_size:
        raise ValueError(f"--sde_window_range {low},{high} must satisfy 0 <= a < b <= --num_inference_steps "
                         f"({num_inference_steps}) and b - a >= --sde_window_size ({window_size}).")
    if high == num_inference_steps and window_size < 2:
        raise ValueError(f"--sde_window_size 1 with --sde_window_range ending at T ({num_inference_steps}) may draw "
                         "only the last step, which is never trained: use a window of >= 2 or end the range before T.")
    return low, high


def num_window_train_steps(num_inference_steps: int, window_size: int, timestep_fraction: float,
                           range_end: int) -> int:
    """Steps trained per rollout with the window: max(1, int(W * timestep_fraction)), at most the window's trainable
    steps (W - 1 when the range reaches T, whose last step is never trained). W = T gives ``num_train_steps``."""
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"--timestep_fraction must be in (0, 1]; got {timestep_fraction}.")
    cap = window_size - 1 if range_end == num_inference_steps else window_size
    return max(1, min(int(window_size * timestep_fraction), cap))
