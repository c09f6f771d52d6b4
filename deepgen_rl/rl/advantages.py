"""Group-relative advantages: GRPO (normalise the weighted reward sum), GDPO (normalise each reward, then sum) and
the two batch-std variants of the reference: grpo_global_std (group mean, batch std) and reinforcepp (batch mean,
batch std; REINFORCE++, arXiv 2501.03262).

Shape legend: B prompts, G group size, N = B * G samples (a prompt's G samples adjacent), K rewards.

Inputs are per-reward scores ``rewards`` [N, K], per-sample reward weights ``weights`` [N, K] (from the prompt's
dataset; 0 where that dataset does not use the reward, whose score may then be NaN) and a ``valid`` mask [N]
(False for a sample whose reward could not be computed after retries). Invalid samples are left out of every
statistic, get advantage 0 and must be left out of the loss: the mask is returned with the advantages.

Statistics use the unbiased (n - 1) std, as ``torch.Tensor.std`` (and TRL) do; a group with fewer than two valid
samples has std 0 (and every advantage in it is 0 anyway). Math runs in float64; results are float32.

Zero-variance groups: a group whose spread is float noise carries no signal, but dividing by (std + 1e-4) and
(GDPO) batch-normalising again turns it into unit-scale advantages (seven 0.35 and one 0.35 + 1 float32 ulp gave
|A| = 1.27 under GDPO; seven 0.0 and one 3e-8 gave |A| = 1.75). So a group is zero-variance when, over its valid
samples, std <= rtol * max|r| + atol (``zero_variance_rtol``, ``ZERO_VARIANCE_ATOL``): its normalised values are
0, its advantages are 0 and it is counted, for GRPO and GDPO alike. Two terms because float32 rounding has two
sources: the relative term covers rewards of any magnitude (the rounding of a value scales with it); the absolute
term covers rewards near 0, whose rounding scales with the O(1) quantities the scorer computed them from (a sigmoid
of a large negative logit, 1 - cos, the difference of two O(1) scores), not with the tiny result.
Stats in the result describe this rank's samples; the batch statistics (GDPO's normalisation, the batch std of
grpo_global_std and reinforcepp, reinforcepp's batch mean) span ALL ranks (the reference uses each rank's batch).
reinforcepp has no group baseline, so a zero-variance group still gets the (batch-centred) advantage of its reward;
it is only counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

from deepgen_rl.core.distributed import all_reduce

AdvantageType = Literal["grpo", "gdpo", "grpo_global_std", "reinforcepp"]
ADVANTAGE_TYPES: tuple[str, ...] = get_args(AdvantageType)
STD_EPS = 1e-4  # added to every std (docs/algorithms.md#advantages), as in the reference
# Below this absolute std a group carries no signal, whatever its magnitude. WHY 1e-6: scorers compute in float32
# from O(1) intermediates, whose unit roundoff is 2**-24 = 6e-8; a few operations leave errors of several ulps of 1
# (1.2e-7 each) even in a result near 0, so an absolute spread below ~8 ulps of 1 cannot be told from rounding (the
# old 1e-8 let seven 0.0 and one 3e-8, std 1.06e-8, through as a full-scale signal). Real reward spreads are orders
# above it (a 1e-4 gap on any reward is kept: its std is 3.5e-5 in a group of 8).
ZERO_VARIANCE_ATOL = 1e-6


@dataclass(frozen=True)
class AdvantageResult:
    """advantages: [N] fp32 (clipped; 0 for invalid samples); valid: [N] bool, the samples the loss may use.

    zero_variance_group_fraction: fraction of groups with no learning signal (every used reward constant over the
    group's valid samples, or fewer than 2 valid samples). clip_fraction: fraction of valid samples whose
    advantage was clipped. num_valid / num_groups: counts on this rank.
    """

    advantages: Tensor
    valid: Tensor
    zero_variance_group_fraction: float
    clip_fraction: float
    num_valid: int
    num_groups: int


def _check_inputs(rewards: Tensor, weights: Tensor, group_size: int, valid: Optional[Tensor]) -> Tensor:
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, K] (samples x reward functions); got shape {tuple(rewards.shape)}.")
    if weights.shape != rewards.shape:
        raise ValueError(f"weights must match rewards' shape {tuple(rewards.shape)}; got {tuple(weights.shape)}.")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"N = {rewards.shape[0]} samples is not a whole number of groups of group_size "
                         f"(--rollout_n) = {group_size}.")
    if valid is None:
        return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    if valid.shape != rewards.shape[:1]:
        raise ValueError(f"valid must be [N] = [{rewards.shape[0]}]; got {tuple(valid.shape)}.")
    return valid.to(device=rewards.device, dtype=torch.bool)


def _clean_rewards(rewards: Tensor, weights: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the scores that do not count (invalid sample or unused reward); a used score must be finite."""
    used = (weights != 0) & valid[:, None]
    bad = used & ~torch.isfinite(rewards)
    if bool(bad.any()):
        sample, reward = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"reward {reward} of sample {sample} is {rewards[sample, reward].item()} but the sample is "
                         "marked valid: mark failed samples invalid instead of scoring them.")
    zero = torch.zeros((), dtype=torch.float64, device=rewards.device)
    return torch.where(used, rewards.double(), zero), torch.where(valid[:, None], weights.double(), zero)


def group_normalize(values: Tensor, valid: Tensor, group_size: int, std_floor: float,
                    zero_variance_rtol: float) -> tuple[Tensor, Tensor]:
    """(x - mean_G x) / (max(std_G x, floor) + 1e-4) per group over valid samples (Flow-GRPO eq. 4 / GDPO eq. 5);
    0 for a zero-variance group (std <= rtol * max|x| + atol, or fewer than 2 valid samples).

    values: [N, K] float64; valid: [N] bool -> (normalised [N, K] (0 at invalid rows), flat [B, K] bool).
    """
    num, k = values.shape
    x = values.view(num // group_size, group_size, k)
    m = valid.view(num // group_size, group_size, 1).to(values.dtype)
    count = m.sum(dim=1)  # [B, 1]
    mean = (x * m).sum(dim=1) / count.clamp_min(1)
    var = ((x - mean[:, None]) ** 2 * m).sum(dim=1) / (count - 1).clamp_min(1)
    std = torch.where(count >= 2, var.sqrt(), torch.zeros_like(var))  # [B, K]
    magnitude = (x.abs() * m).amax(dim=1)  # [B, K]
    flat = (std <= zero_variance_rtol * magnitude + ZERO_VARIANCE_ATOL) | (count < 2)  # [B, K]
    normalised = (x - mean[:, None]) / (std.clamp_min(std_floor)[:, None] + STD_EPS) * m * ~flat[:, None]
    return normalised.view(num, k), flat


def _flat_groups(flat: Tensor, used: Tensor) -> Tensor:
    """flat: [B, K] per-reward zero-variance; used: [B, K] reward used by the group -> [B] groups without signal
    (every used reward flat; a group with fewer than 2 valid samples is flat in every column)."""
    return (flat | ~used).all(dim=1)


def _zero_variance_fraction(flat_groups: Tensor) -> float:
    return float(flat_groups.double().mean()) if flat_groups.numel() else 0.0


def batch_mean_std(values: Tensor, valid: Tensor, process_group=None) -> tuple[Tensor, Tensor]:
    """(mean, unbiased std) of the valid samples of ALL ranks. values: [N] float64 -> two 0-d float64 tensors.

    Two all_reduces of two scalars (sum and count, then the centred sum of squares): exactly the statistics of
    the concatenated batch without gathering it. Every rank must call this (it is a collective).
    """
    m = valid.to(values.dtype)
    total = all_reduce(torch.stack([(values * m).sum(), m.sum()]), None, group=process_group)
    count = total[1]
    mean = total[0] / count.clamp_min(1)
    sq = all_reduce(((values - mean) ** 2 * m).sum().reshape(1), None, group=process_group)[0]
    std = torch.where(count >= 2, (sq / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(sq))
    return mean, std


def batch_normalize(values: Tensor, valid: Tensor, process_group=None) -> Tensor:
    """(x - mean) / (std + 1e-4) over the valid samples of ALL ranks (GDPO eq. 6). values: [N] float64.

    Collective (see :func:`batch_mean_std`): every rank must call this.
    """
    mean, std = batch_mean_std(values, valid, process_group)
    return (values - mean) / (std + STD_EPS) * valid.to(values.dtype)


def _finish(raw: Tensor, valid: Tensor, zero_fraction: float, clip: float, group_size: int) -> AdvantageResult:
    if clip <= 0:
        raise ValueError(f"advantage clip (--advantage_clip) must be > 0; got {clip}.")
    clipped = (raw.abs() > clip) & valid
    num_valid = int(valid.sum())
    return AdvantageResult(
        advantages=raw.clamp(-clip, clip).float() * valid,
        valid=valid,
        zero_variance_group_fraction=zero_fraction,
        clip_fraction=float(clipped.sum()) / max(num_valid, 1),
        num_valid=num_valid,
        num_groups=valid.shape[0] // group_size,
    )


def grpo_advantages(rewards: Tensor, weights: Tensor, group_size: int, *, valid: Optional[Tensor] = None,
                    std_floor: float, clip: float, zero_variance_rtol: float) -> AdvantageResult:
    """GRPO: r = sum_k w_k r_k; A = (r - mean_G r) / (max(std_G r, floor) + 1e-4); clip to [-clip, clip].

    rewards, weights: [N, K]; valid: [N] bool (None = all valid). No batch normalisation, no collective.
    """
    valid = _check_inputs(rewards, weights, group_size, valid)
    r, w = _clean_rewards(rewards, weights, valid)
    total = (w * r).sum(dim=1, keepdim=True)  # [N, 1]
    adv, flat = group_normalize(total, valid, group_size, std_floor, zero_variance_rtol)
    used = (w != 0).view(-1, group_size, w.shape[1]).any(dim=1).any(dim=1, keepdim=True)  # [B, 1]
    return _finish(adv[:, 0], valid, _zero_variance_fraction(_flat_groups(flat, used)), clip, group_size)


def gdpo_advantages(rewards: Tensor, weights: Tensor, group_size: int, *, valid: Optional[Tensor] = None,
                    std_floor: float, clip: float, zero_variance_rtol: float,
                    process_group=None) -> AdvantageResult:
    """GDPO (arXiv 2601.05242): A_k = group-normalised r_k; S = sum_k w_k A_k; A = batch-normalised S over all
    ranks (when torch.distributed is initialised; collective: call on every rank); clip to [-clip, clip].

    rewards, weights: [N, K]; valid: [N] bool (None = all valid); std_floor bounds each reward's group std.
    """
    valid = _check_inputs(rewards, weights, group_size, valid)
    r, w = _clean_rewards(rewards, weights, valid)
    per_reward, flat = group_normalize(r, valid, group_size, std_floor, zero_variance_rtol)  # [N, K], [B, K]
    summed = (w * per_reward).sum(dim=1)  # [N]
    adv = batch_normalize(summed, valid, process_group)
    used = (w != 0).view(-1, group_size, w.shape[1]).any(dim=1)  # [B, K]
    flat_groups = _flat_groups(flat, used)  # [B]
    # A flat group's S is 0, but the batch mean it is centred on is 0 only up to rounding: zero it exactly.
    adv = adv * ~flat_groups.repeat_interleave(group_size)
    return _finish(adv, valid, _zero_variance_fraction(flat_groups), clip, group_size)


def batch_std_advantages(rewards: Tensor, weights: Tensor, group_size: int, *, baseline: str,
                         valid: Optional[Tensor] = None, std_floor: float, clip: float, zero_variance_rtol: float,
                         process_group=None) -> AdvantageResult:
    """The reference's batch-std types on r = sum_k w_k r_k, over ALL ranks (collective: call on every rank):

    baseline "group" (grpo_global_std): A = (r - mean_G r) / (max(std_batch r, floor) + 1e-4);
    baseline "batch" (reinforcepp, REINFORCE++ eq. 9): A = (r - mean_batch r) / (max(std_batch r, floor) + 1e-4).
    std_batch is the unbiased std of r over the valid samples of all ranks; then clip to [-clip, clip].
    rewards, weights: [N, K]; valid: [N] bool (None = all valid).
    """
    valid = _check_inputs(rewards, weights, group_size, valid)
    r, w = _clean_rewards(rewards, weights, valid)
    total = (w * r).sum(dim=1)  # [N]
    batch_mean, batch_std = batch_mean_std(total, valid, process_group)
    # group_normalize gives the zero-variance flags (and, through its centring, the group baseline).
    _, flat = group_normalize(total[:, None], valid, group_size, std_floor, zero_variance_rtol)
    used = (w != 0).view(-1, group_size, w.shape[1]).any(dim=1).any(dim=1, keepdim=True)  # [B, 1]
    flat_groups = _flat_groups(flat, used)  # [B]
    m = valid.to(total.dtype)
    if baseline == "group":
        grouped, grouped_m = total.view(-1, group_size), m.view(-1, group_size)
        group_mean = (grouped * grouped_m).sum(dim=1) / grouped_m.sum(dim=1).clamp_min(1)  # [B]
        centred = (total - group_mean.repeat_interleave(group_size)) * ~flat_groups.repeat_interleave(group_size)
    elif baseline == "batch":
        centred = total - batch_mean
    else:
        raise ValueError(f"baseline must be 'group' or 'batch'; got {baseline!r}.")
    adv = centred / (batch_std.clamp_min(std_floor) + STD_EPS) * m
    return _finish(adv, valid, _zero_variance_fraction(flat_groups), clip, group_size)


def compute_advantages(adv_type: AdvantageType, rewards: Tensor, weights: Tensor, group_size: int, *,
                       valid: Optional[Tensor] = None, std_floor: float, clip: float, zero_variance_rtol: float,
                       process_group=None) -> AdvantageResult:
    """Dispatch on ``--atrain_adv_type`` (``zero_variance_rtol``: ``--zero_variance_rtol``)."""
    if adv_type == "grpo":
        return grpo_advantages(rewards, weights, group_size, valid=valid, std_floor=std_floor, clip=clip,
                               zero_variance_rtol=zero_variance_rtol)
    if adv_type == "gdpo":
        return gdpo_advantages(rewards, weights, group_size, valid=valid, std_floor=std_floor, clip=clip,
                               zero_variance_rtol=zero_variance_rtol, process_group=process_group)
    if adv_type in ("grpo_global_std", "reinforcepp"):
        return batch_std_advantages(rewards, weights, group_size, baseline="group" if adv_type == "grpo_global_std"
                                    else "batch", valid=valid, std_floor=std_floor, clip=clip,
                                    zero_variance_rtol=zero_variance_rtol, process_group=process_group)
    raise ValueError(f"--atrain_adv_type must be one of {', '.join(ADVANTAGE_TYPES)}; got {adv_type!r}.")
