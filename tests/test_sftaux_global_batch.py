"""The SFT-aux batch is global (--sftaux_global_batch_size K items per GRPO step over all ranks): rank r takes a
contiguous slice of the items 0 .. K - 1 and its loss is (sum of its items' losses) / (K / W), so DeepSpeed's
average over the W ranks is the mean over all K items on any world size (deepgen_rl/core/sftaux_batch.py).

Checked on the trainer's own ``_sftaux_loss`` with a stand-in sampler and a stand-in objective whose per-item loss
is a known float64 function of one parameter: the ranks' shares averaged as DeepSpeed does equal the mean over the
K items (value and gradient) computed independently here, for W = 1, 2, 3 (uneven) and 7 (> K: ranks with no item).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepgen_rl.core.distributed import SEED_SFTAUX
from deepgen_rl.core.sftaux_batch import max_items_per_rank, rank_items
from deepgen_rl.trainer import grpo_trainer
from deepgen_rl.trainer.global_draws import sample_seeds

K, SEED, STEP = 5, 11, 3


@pytest.mark.parametrize("items, world, slices", [
    (5, 1, [(0, 5)]),
    (6, 2, [(0, 3), (3, 3)]),
    (5, 2, [(0, 3), (3, 2)]),
    (5, 3, [(0, 2), (2, 2), (4, 1)]),
    (2, 4, [(0, 1), (1, 1), (2, 0), (2, 0)]),
])
def test_ranks_take_contiguous_slices_that_cover_the_batch_once(items, world, slices):
    got = [rank_items(items, world, r) for r in range(world)]
    assert [(s.first, s.count) for s in got] == slices
    assert max(s.count for s in got) == max_items_per_rank(items, world)
    assert [s.loss_scale for s in got] == [count * world / items for _, count in slices]
    # a rank with no item runs one phantom item (at weight 0); the others run their own
    assert [s.drawn for s in got] == [(first, count) if count else (0, 1) for first, count in slices]


def test_bad_global_batch_names_the_flag():
    with pytest.raises(ValueError, match="--sftaux_global_batch_size"):
        rank_items(0, 2, 0)
    assert max_items_per_rank(3, 8) == 1 and max_items_per_rank(33, 8) == 5


def item_loss(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """l_i(w) = (i + 1) w^2 - sin(i + 1) w: distinct per global item index i. -> [len(index)]"""
    i = index.to(torch.float64)
    return (i + 1) * w * w - torch.sin(i + 1) * w


class StandInSampler:
    """Item i's 'image' carries its global index (read back by the stand-in objective)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def sample(self, first: int, count: int):
        self.calls.append((first, count))
        index = torch.arange(first, first + count, dtype=torch.float64)
        return SimpleNamespace(images=index.view(-1, 1, 1, 1).expand(-1, 3, 2, 2), captions=[""] * count)


def _shares(monkeypatch, w: torch.Tensor, world: int):
    """[(L_r, item loss sum of rank r)] for r < world, each from the trainer's ``_sftaux_loss``."""
    seeds: list[list[int]] = []

    def objective(model, images, captions, generator, *, text_trains):
        seeds.append([g.initial_seed() for g in generator.generators])
        return item_loss(w, images[:, 0, 0, 0]).mean()  # the real objective's mean over its rows

    monkeypatch.setattr(grpo_trainer, "sftaux_objective", objective)
    shares = []
    for rank in range(world):
        trainer = grpo_trainer.DeepGenGRPOTrainer.__new__(grpo_trainer.DeepGenGRPOTrainer)
        sampler = StandInSampler()
        trainer.__dict__.update(args=SimpleNamespace(seed=SEED, sftaux_global_batch_size=K), rank=rank,
                                world_size=world, device=torch.device("cpu"), model=None, text_trains=False,
                                sftaux_sampler=sampler)
        shares.append(trainer._sftaux_loss(STEP))
        first, count = rank_items(K, world, rank).drawn
        assert sampler.calls == [(first, count)]  # one batch per step: the sampler's position stays in step
        assert seeds[-1] == sample_seeds(SEED, SEED_SFTAUX, STEP, first, count)  # noise keyed by global item
    return shares


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_rank_shares_average_to_the_mean_over_all_items(monkeypatch, world):
    w = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    shares = _shares(monkeypatch, w, world)
    # DeepSpeed averages the ranks' gradients: the gradient of (1 / W) sum_r L_r.
    averaged = torch.stack([loss for loss, _ in shares]).sum() / world
    (grad,) = torch.autograd.grad(averaged, w, retain_graph=True)

    # Independently: the mean over the K items of the step, and its derivative in closed form.
    index = torch.arange(K, dtype=torch.float64)
    w0 = 0.8
    mean = float(((index + 1) * w0 * w0 - torch.sin(index + 1) * w0).mean())
    derivative = float((2 * (index + 1) * w0 - torch.sin(index + 1)).mean())
    assert float(averaged.detach()) == pytest.approx(mean, rel=1e-12)
    assert float(grad) == pytest.approx(derivative, rel=1e-12)
    # The logged loss/sft: the sum of every rank's item losses over K (the trainer's all-reduce, summed here).
    assert sum(item_sum for _, item_sum in shares) / K == pytest.approx(mean, rel=1e-12)
    # Ranks past K ran a backward too (same graph on every rank, so ZeRO's buckets stay in step), at weight 0.
    for rank, (loss, item_sum) in enumerate(shares):
        if rank >= K:
            assert loss.requires_grad and float(loss.detach()) == 0.0 and item_sum == 0.0
            assert float(torch.autograd.grad(loss, w)[0]) == 0.0



def test_preflight_warns_when_ranks_get_no_item():
    from deepgen_rl.preflight.launch_checks import sftaux_idle_ranks_warning

    def args(items, coef=1e-4):
        return SimpleNamespace(sftaux_global_batch_size=items, sftaux_coef=coef)

    warning = sftaux_idle_ranks_warning(args(4), 8)
    assert "--sftaux_global_batch_size 4 < world size 8: 4 rank(s) get no SFT-aux item" in warning
    assert sftaux_idle_ranks_warning(args(8), 8) is None and sftaux_idle_ranks_warning(args(4, coef=0.0), 8) is None


def test_estimator_names_the_replacement_of_the_removed_flag(capsys):
    from deepgen_rl.estimate_memory import main

    with pytest.raises(SystemExit):
        main(["--num_gpus", "8", "--output_dir", "/tmp/unused", "--sftaux_batch_size", "4"])
    assert "--sftaux_global_batch_size" in capsys.readouterr().err
