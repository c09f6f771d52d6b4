"""Each draw of a GRPO step is keyed by global position (trainer/global_draws.py), checked without a model: what
rank r of W draws is rows r*n .. r*n + n - 1 of what one rank drawing the whole batch draws, for the prompts, the
SFT-aux items, the per-sample noise streams, the actor-update parts and DiffusionNFT's draw; and --replay_step's
flag checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepgen_rl.data import PromptSampler
from deepgen_rl.data.dataset_yaml import load_dataset_config
from deepgen_rl.sampling.noise import SampleNoise
from deepgen_rl.sampling.rollout import initial_noise
from deepgen_rl.trainer.global_draws import actor_update_generators, rollout_noise
from deepgen_rl.trainer.update_plan import actor_update_parts
from tests.trainer_utils import QUICKSTART_YAML


def _key(sample):
    return sample.dataset, sample.index


def test_prompts_of_two_ranks_are_the_single_rank_batch_split():
    config = load_dataset_config(QUICKSTART_YAML)
    single = PromptSampler(config, seed=5)
    ranks = [PromptSampler(config, seed=5, rank=r) for r in range(2)]
    for _ in range(3):  # consecutive batches, as consecutive GRPO steps
        whole = [_key(s) for s in single.sample(8)]
        split = [_key(s) for sampler in ranks for s in sampler.sample(4)]
        assert split == whole
    assert len(set(whole)) > 1


def test_sample_noise_is_per_row_whatever_the_split():
    whole = rollout_noise(3, 7, 0, 8, torch.device("cpu"))
    halves = [rollout_noise(3, 7, r, 4, torch.device("cpu")) for r in range(2)]
    a = whole.randn((2, 3))
    b = torch.cat([h.randn((2, 3)) for h in halves])
    assert torch.equal(a, b)
    # A micro-batch view advances the same streams: rows 0-3 then 4-7 == all 8 at once (the next draw).
    nxt = torch.cat([whole.select(slice(0, 4)).randn((2, 3)), whole.select(slice(4, 8)).randn((2, 3))])
    assert torch.equal(nxt, torch.cat([h.randn((2, 3)) for h in halves]))
    assert not torch.equal(a, nxt)


def test_initial_noise_shared_within_a_group_comes_from_its_first_row():
    noise = SampleNoise([11, 12, 13, 14], "cpu")
    x = initial_noise(2, 2, (1, 2, 2), same_in_group=True, generator=noise, device=torch.device("cpu"))
    first = torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(11))
    third = torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(13))
    assert torch.equal(x[0], first) and torch.equal(x[1], first) and torch.equal(x[2], third)


def test_actor_update_parts_do_not_depend_on_the_world_size():
    whole = actor_update_parts(8, 2, actor_update_generators(9, 4, 0, 8, 2))
    halves = [actor_update_parts(4, 2, actor_update_generators(9, 4, r, 4, 2)) for r in range(2)]
    for k in range(2):
        split = torch.cat([halves[r][k] + 4 * r for r in range(2)])  # rank r's row i is global row 4r + i
        assert torch.equal(whole[k], split)
    # Every block of 2 consecutive rows gives one row to each part; together the parts cover all rows once.
    assert sorted(torch.cat(whole).tolist()) == list(range(8))
    assert all(sorted((whole[0][j].item(), whole[1][j].item())) == [2 * j, 2 * j + 1] for j in range(4))


def test_nft_draw_rows_are_keyed_by_global_sample():
    from deepgen_rl.trainer.nft import NftOldPolicy

    draw = NftOldPolicy.draw  # uses no instance state
    trajectory = SimpleNamespace(num_steps=6, num_samples=8)
    whole = draw(None, trajectory, 3, seed=2, step=1, first_sample=0)
    second = draw(None, SimpleNamespace(num_steps=6, num_samples=4), 3, seed=2, step=1, first_sample=4)
    assert torch.equal(whole.steps[4:], second.steps)
    like = torch.zeros(8, 2, 2, 2)
    assert torch.equal(whole.noise(1, like)[4:], second.noise(1, like[4:]))


def test_sftaux_items_of_two_ranks_are_the_single_rank_batch_split(tmp_path):
    from PIL import Image

    from deepgen_rl.sft.aux_data import SftAuxDataset, SftAuxSampler
    from deepgen_rl.core.sftaux_batch import rank_items

    items = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)
        items.append((path, f"caption {i}"))
    datasets = [SftAuxDataset("a", tuple(items[:4]), 1.0), SftAuxDataset("b", tuple(items[4:]), 2.0)]
    # 5 items over 2 ranks: rank 0 takes global items 0-2, rank 1 items 3-4 (core/sftaux_batch.py)
    single = SftAuxSampler(datasets, seed=1, height=8, width=8).sample(0, 5)
    split = [SftAuxSampler(datasets, seed=1, height=8, width=8).sample(*rank_items(5, 2, r).drawn) for r in range(2)]
    assert [len(s.captions) for s in split] == [3, 2]
    assert single.captions == split[0].captions + split[1].captions
    assert torch.equal(single.images, torch.cat([s.images for s in split]))


@pytest.mark.parametrize("step, resume, out, fragment", [
    (2, None, "/tmp/r", "pass --resume_from_checkpoint <run output_dir>/checkpoint-1"),
    (3, "latest", "/tmp/r", "needs the checkpoint folder itself"),
    (3, "/runs/a/checkpoint-1", "/tmp/r", "or --replay_step 2"),
    (2, "/runs/a/checkpoint-1", "/runs/a", "the folder of the run it replays"),
    (-1, None, "/tmp/r", "must be >= 1"),
])
def test_replay_flag_problems_name_the_fix(step, resume, out, fragment):
    from deepgen_rl.trainer.replay import replay_problem

    assert fragment in replay_problem(step, resume, out)


def test_replay_flags_that_can_replay():
    from deepgen_rl.trainer.replay import last_step, replay_problem

    assert replay_problem(0, None, "/x") is None and replay_problem(1, None, "/x") is None
    assert replay_problem(2, "/runs/a/checkpoint-1", "/runs/replay") is None
    assert last_step(2, 10) == 2 and last_step(0, 10) == 10


@pytest.mark.parametrize("schedule, expected", [("per_timestep", [3.5, 3.5, 2.5, 2.5]), ("per_rollout", [12.0] * 4)])
def test_loss_denominators_count_the_valid_samples_of_every_rank(monkeypatch, schedule, expected):
    # Rank 0 of 2 with 3 + 4 valid samples in its two parts; the other rank has 4 + 1. DeepSpeed averages the two
    # ranks' gradients, so each part's mean over ALL its valid samples divides by (global count) / 2.
    from deepgen_rl.trainer import updater

    other = torch.tensor([4.0, 1.0], dtype=torch.float64)
    monkeypatch.setattr(updater, "all_reduce_sum", lambda counts, device: counts + other)
    ctx = updater.StepUpdate(
        engine=None, model=None, plan=SimpleNamespace(optimizer_step_schedule=schedule, train_micro_batch_size=4),
        ema=None, device=torch.device("cpu"), objective=None, safe_point=None,
        batch=SimpleNamespace(trajectory=SimpleNamespace(num_samples=8)), adv=None, valid=None, policy_share=1.0,
        global_step=0, world_size=2)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    parts = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])]
    denominators = [d for _, _, d, _ in ctx.schedule(parts, [0, 1], valid, sftaux=False)]
    # per timestep: part 0 (3 + 4) / 2 = 3.5, part 1 (4 + 1) / 2 = 2.5; per rollout: (3.5 + 2.5) x 2 steps
    assert denominators == expected


def test_a_prompt_padded_to_the_steps_length_is_conditioned_as_in_the_whole_batch():
    # One rank of two encodes only its own prompt; padded to the step's global longest chat text it gets the
    # conditioning that one rank encoding both prompts gives it (SD3 attends to the pad positions too).
    from deepgen_rl.model.prompt_padding import longest_chat_text, pad_floor, padded_to_at_least
    from deepgen_rl.model.tiny import build_tiny_deepgen

    model = build_tiny_deepgen(0).eval()
    short, long = "a red cube", "a very long prompt about a blue sphere on a green table under the evening sun"
    with torch.no_grad():
        both, both_pooled = model.encode_prompt([short, long])
        alone, _ = model.encode_prompt([short])
        with padded_to_at_least(longest_chat_text(model, [short, long], with_negative=False)):
            floored, floored_pooled = model.encode_prompt([short])
    assert alone.shape[1] < both.shape[1]  # without the floor the lone prompt is conditioned differently
    assert floored.shape == both[:1].shape
    assert torch.allclose(floored[0], both[0], atol=1e-6) and torch.allclose(floored_pooled[0], both_pooled[0],
                                                                             atol=1e-6)
    assert pad_floor() == 0  # scoped to the block


def test_preflight_checks_the_replay_flags_before_any_server(tiny_paths, tmp_path, capsys):
    # train.sh's preflight: a replay into the replayed run's own folder, or into another run's, is named at once;
    # into a new folder it may launch. Nothing is moved.
    from deepgen_rl import preflight
    from tests.test_run_folder import fake_checkpoint
    from tests.trainer_utils import QUICKSTART_YAML

    run, used = tmp_path / "run", tmp_path / "used"
    fake_checkpoint(run, 1)
    fake_checkpoint(used, 5)

    def flags(out):
        return ["--output_dir", str(out), "--eval_freq", "0", "--sftaux_coef", "0",
                "--dataset_config", str(QUICKSTART_YAML), "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir),
                "--resume_from_checkpoint", str(run / "checkpoint-1"), "--replay_step", "2"]

    assert preflight.main(flags(run)) == 1
    assert "the folder of the run it replays" in capsys.readouterr().err
    assert preflight.main(flags(used)) == 1
    assert f"--output_dir {used} already holds another run" in capsys.readouterr().err
    assert preflight.main(flags(tmp_path / "replay")) == 0
    assert (run / "checkpoint-1").is_dir() and (used / "checkpoint-5").is_dir()
