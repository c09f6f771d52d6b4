"""The same run on 1 and on 2 ranks (docs/reproducibility.md): every draw of a GRPO step is keyed by the global
position of what it draws, so the same flags, seed and --global_batch_size give the same prompts, noise, images,
rewards, advantages and (to reduction-order rounding) weights; --replay_step N replays step N of a 2-rank run from
its checkpoint-(N-1) on 1 rank.

Four real runs (torchrun, gloo, DS_ACCELERATOR=cpu, ZeRO-2, the tiny model in fp32, 2 GRPO steps, 2 actor-update
parts so the part draw is exercised, SFT-aux on at --sftaux_coef 0.3 with a global batch of ONE item: on 2 ranks
rank 0 takes it at loss scale 2 and rank 1 runs a zero-weight item, so the uneven split, its normalisation and
the empty rank's part in ZeRO's gradient reduction are all exercised), shared by every test of the module:
    two      2 ranks, checkpoints 1 and 2
    one      1 rank, the same flags (its rollout micro-batch is 4, the 2-rank run's 8 is 4 rows per rank)
    replay   1 rank, --replay_step 2 from two/checkpoint-1 (AdamW's moments re-split: optimizer_reshard.py)
    resumed  1 rank, a plain resume of two/checkpoint-1 with --resume_reset_optimizer (moments restart)

Tolerances, from where the runs' arithmetic differs:
* draws (prompts, initial noise): identical, bit for bit (keyed integers and seeded generators).
* images, rewards, advantages: the same weights and noise; the DiT and VAE forwards see 4 rows (2 ranks) or
  4-row micro-batches (1 rank), so only kernel blocking may differ: fp32 rounding, |dx| <= 1e-5 (about 100 ulp
  of the O(1) latents after 6 steps). The reward (synthetic_match, smooth in the pixels) within 1e-4; an
  advantage is (r - group mean) / group std, so it moves by at most 2 |dr| / std: compared within
  1e-5 + 4 max|dr| / (the smallest group std).
* weights: the gradient is a sum over 8 samples taken in another order (one rank sums 8, two ranks sum 4 each
  and DeepSpeed averages the two partial sums), i.e. a relative difference of a few fp32 ulp per element. AdamW
  divides it by its own root mean square, so an update element moves by lr x (that relative difference) except
  where the gradient element is ~0 and its sign may flip: then by at most 2 lr. The advantages' own rounding
  (above, relative <= 1e-3) moves the gradient, hence an update element, by up to that relative amount. Per
  element: |w_1 - w_2| <= 2 x lr x steps (the worst case) and, for all but 1 in 1000 elements,
  <= 1e-2 x lr + 4 ulp(w) (4 ulp: each run rounds w + update once per step).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer_utils import REPO_ROOT, ZERO2, run_env, tiny_run_flags, torchrun

# The synthetic task's reward (rewards/synthetic.py) is a soft IoU of colour memberships: smooth in the pixels,
# so an 8-bit pixel that rounds the other way moves it by ~1e-6. JPEG compressibility (the quick start's) counts
# bytes: one such pixel can move it by several 1/(H*W*3) = 8e-5 steps, which GDPO's per-group normalisation
# (group std ~3e-3) would turn into advantage differences of ~0.1 between two correct runs.
SYNTHETIC_YAML = REPO_ROOT / "assets" / "rl_datasets" / "synthetic" / "synthetic.yaml"

SCRIPT = str(REPO_ROOT / "tests" / "invariance_run.py")
TIMEOUT_S = 500
# Four torchrun launches in the module fixture (each mostly process start and DeepSpeed set-up; ~1 min on a free
# 2-core machine, several on a loaded one): beyond the suite's 600 s default for the first test's setup.
pytestmark = pytest.mark.timeout(1800)
FLAGS = {"max_steps": 2, "atrain_num_actor_update_steps": 2, "model_dtype": "float32", "sftaux_coef": 0.3,
         "sftaux_global_batch_size": 1,
         "learning_rate": 1e-4, "lr_scheduler_type": "constant", "beta": 0.0, "dataset_config": str(SYNTHETIC_YAML)}


def _run(tiny_paths, folder, nproc: int, **overrides):
    out, record = folder / "run", folder / "record"
    flags = tiny_run_flags(tiny_paths, out, deepspeed=str(ZERO2), **{**FLAGS, **overrides})
    result = torchrun(nproc, [SCRIPT, "--record_dir", str(record), *flags], run_env(tiny_paths), TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(record / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
    steps = sorted(ranks[0])
    merged = {step: {key: _cat([r[step][key] for r in ranks]) for key in ranks[0][step]} for step in steps}
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    return {"out": out, "steps": merged, "params": torch.load(record / "params.pt", weights_only=False),
            "metrics": metrics}


def _cat(parts):
    """Rank 0's rows, then rank 1's: the global order."""
    if isinstance(parts[0], list):
        return [item for part in parts for item in part]
    return None if parts[0] is None else torch.cat(parts)


@pytest.fixture(scope="module")
def runs(tiny_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    two = _run(tiny_paths, root / "two", 2, rollout_micro_batch_size=8, save_strategy="steps", save_steps=1)
    one = _run(tiny_paths, root / "one", 1, rollout_micro_batch_size=4)
    replay = _run(tiny_paths, root / "replay", 1, rollout_micro_batch_size=4, replay_step=2,
                  resume_from_checkpoint=str(two["out"] / "checkpoint-1"), save_strategy="steps", save_steps=1)
    resumed = _run(tiny_paths, root / "resumed", 1, rollout_micro_batch_size=4,
                   resume_from_checkpoint=str(two["out"] / "checkpoint-1"), resume_reset_optimizer=True)
    return {"two": two, "one": one, "replay": replay, "resumed": resumed}


def _same_step(got: dict, want: dict, group_size: int = 4) -> None:
    assert got["prompts"] == want["prompts"] and torch.equal(got["x0"], want["x0"])
    assert (got["images"] - want["images"]).abs().max() <= 1e-5
    reward_gap = float((got["scores"] - want["scores"]).abs().max())
    assert reward_gap <= 1e-4
    group_std = float(want["scores"].sum(dim=1).reshape(-1, group_size).std(dim=1).min())
    advantage_gap = float((got["advantages"] - want["advantages"]).abs().max())
    assert advantage_gap <= 1e-5 + 4 * reward_gap / group_std, (advantage_gap, reward_gap, group_std)


def test_same_prompts_and_noise_on_any_world_size(runs):
    for step in (1, 2):
        one, two = runs["one"]["steps"][step], runs["two"]["steps"][step]
        assert one["prompts"] == two["prompts"]
        assert torch.equal(one["x0"], two["x0"])  # keyed draws: bit for bit
    # Not one fixed list: the two steps drew other prompts or at least other noise.
    assert not torch.equal(runs["one"]["steps"][1]["x0"], runs["one"]["steps"][2]["x0"])


def test_same_images_rewards_and_advantages_of_the_first_step(runs):
    one, two = runs["one"]["steps"][1], runs["two"]["steps"][1]
    assert one["images"].shape == two["images"].shape == (8, 3, 64, 64)
    _same_step(one, two)
    assert one["advantages"].abs().max() > 0.1  # groups with a reward spread: the comparison is not of zeros


def _weight_gaps(a: dict, b: dict, before: dict, lr: float, steps: int):
    """(worst |a - b| / (2 lr steps), share of elements over 1e-3 lr + 4 ulp(w)) over every trainable tensor."""
    worst, over, total = 0.0, 0, 0
    for name, tensor in a.items():
        gap = (tensor - b[name]).abs()
        worst = max(worst, float(gap.max()) / (2 * lr * steps))
        ulp = torch.finfo(torch.float32).eps * tensor.abs()
        over += int((gap > 1e-2 * lr + 4 * ulp).sum())
        total += gap.numel()
        assert not torch.equal(tensor, before[name]) or name.endswith(("add_q_proj.weight", "add_q_proj.bias"))
    return worst, over / total


def test_weights_after_two_steps_match_within_reduction_order(runs):
    one, two = runs["one"]["params"], runs["two"]["params"]
    lr = one["learning_rate"]
    worst, share = _weight_gaps(one["after"], two["after"], one["before"], lr, steps=2)
    assert worst <= 1.0 and share <= 1e-3, (worst, share)
    for step in (1, 2):
        m1, m2 = runs["one"]["metrics"][step], runs["two"]["metrics"][step]
        for key in ("reward/mean", "reward/std", "loss/policy", "loss/sft", "train/grad_norm"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-3, abs=1e-6), key


def test_replay_of_step_two_on_one_rank_reproduces_the_two_rank_step(runs):
    replay, two = runs["replay"], runs["two"]
    assert sorted(replay["steps"]) == [2] and sorted(replay["metrics"]) == [2]  # exactly step 2, then stop
    _same_step(replay["steps"][2], two["steps"][2])
    for key in ("reward/mean", "loss/policy", "loss/sft", "train/grad_norm"):
        assert replay["metrics"][2][key] == pytest.approx(two["metrics"][2][key], rel=1e-3, abs=1e-6), key
    # The same update: AdamW's moments of the 2-rank checkpoint were re-split for 1 rank.
    lr = replay["params"]["learning_rate"]
    worst, share = _weight_gaps(replay["params"]["after"], two["params"]["after"], replay["params"]["before"], lr,
                                steps=1)
    assert worst <= 1.0 and share <= 1e-3, (worst, share)
    # The original run is only read: its checkpoints stay; the replay saved its own step 2 and nothing else.
    assert (two["out"] / "checkpoint-1").is_dir() and (two["out"] / "checkpoint-2").is_dir()
    assert sorted(p.name for p in replay["out"].glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list(two["out"].glob("abandoned-*"))


def test_resume_onto_another_world_size_keeps_the_data_and_noise_streams(runs):
    resumed, two = runs["resumed"], runs["two"]
    assert sorted(resumed["steps"]) == [2]
    _same_step(resumed["steps"][2], two["steps"][2])
    # Only AdamW's moments were reset: the update differs from the run's (Adam's first step moves every weight
    # with a non-zero gradient by ~lr), which is what the replay's re-split moments avoid.
    lr = resumed["params"]["learning_rate"]
    worst, _ = _weight_gaps(resumed["params"]["after"], two["params"]["after"], resumed["params"]["before"], lr,
                            steps=1)
    assert worst > 1e-3
