"""Edit rewards: ``edit_vlm_judge`` over real HTTP against a stand-in vLLM judge process, and ``image_similarity``
(CLIP image-image cosine) against embeddings computed independently."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepgen_rl.config import RewardArguments
from deepgen_rl.rewards.edit_judge import parse_edit_score, render_edit_prompt
from deepgen_rl.rewards.http_utils import RewardServerUnavailable
from deepgen_rl.rewards.registry import build_rewards
from tests.reward_servers import ServerProcess, free_port
from tests.servers.fake_edit_judge import expected_score
from tests.test_reward_clients import tiny_clip_dir  # noqa: F401  (the tiny CLIP folder fixture)

pytestmark = pytest.mark.timeout(120)
FAKE_EDIT_JUDGE = Path(__file__).resolve().parent / "servers" / "fake_edit_judge.py"


def gray(level: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (level, level, level))


def reward_args(url: str, **overrides) -> RewardArguments:
    values = dict(edit_judge_url=url, edit_judge_max_tokens=256, reward_timeout=5.0, reward_max_retries=2,
                  reward_retry_backoff=0.01, reward_health_timeout=2.0, reward_max_concurrency=8)
    return RewardArguments(**{**values, **overrides})


@pytest.fixture(scope="module")
def judge():
    port = free_port()
    with ServerProcess([sys.executable, str(FAKE_EDIT_JUDGE), "--port", str(port)], port) as server:
        yield server


@pytest.mark.parametrize("reply, expected", [
    ("<score>7</score>", 0.7),
    ("thinking <score>2</score> ... final <SCORE> 9.5 </SCORE>", 0.95),  # the last tag counts
    ("<score>10</score>", 1.0),
])
def test_parse_edit_score(reply, expected):
    assert parse_edit_score(reply) == pytest.approx(expected)


@pytest.mark.parametrize("reply", ["7/10", "<score>11</score>", "<score>-1</score>", "", None])
def test_unusable_edit_scores_are_rejected(reply):
    with pytest.raises(ValueError):
        parse_edit_score(reply)


def test_edit_judge_scores_source_and_result_over_http(judge):
    reward = build_rewards(["edit_vlm_judge"], reward_args(judge.url))["edit_vlm_judge"]
    try:
        sources = [[gray(100)], [gray(200), gray(10)], [gray(0)]]
        images = [gray(150), gray(50), gray(255)]
        scores = reward.score(images, ["brighten it", "darken it", "make it white"], [0, 1, 1], sources=sources)
        expected = [expected_score(row[0], image) for row, image in zip(sources, images)]
        assert scores.errors == [None] * 3
        assert scores.values == pytest.approx(expected, abs=1e-6)
        assert expected == pytest.approx([305 / 510, 105 / 510, 1.0])
        assert judge.stats()["last"]["temperature"] == 0.0
        assert scores.metrics["answer_parse_rate"] == 1.0
    finally:
        reward.close()


def test_edit_judge_failures_are_retried_then_reported(judge):
    reward = build_rewards(["edit_vlm_judge"], reward_args(judge.url))["edit_vlm_judge"]
    try:
        before = judge.stats()["counts"]
        instructions = ["GARBAGE edit", "FLAKY edit", "OUTOFRANGE edit", "plain edit"]
        scores = reward.score([gray(60)] * 4, instructions, [0, 0, 0, 0], sources=[[gray(60)]] * 4)
        counts = judge.stats()["counts"]
        assert scores.values[1] == pytest.approx(0.5) and scores.values[3] == pytest.approx(0.5)
        assert scores.values[0] is None and "no '<score>X</score>'" in scores.errors[0]
        assert scores.values[2] is None and "outside [0, 10]" in scores.errors[2]
        # 3 attempts for each reply that never parses (max_retries 2), 2 for the flaky one, 1 for the plain one.
        assert counts["GARBAGE"] - before.get("GARBAGE", 0) == 3
        assert counts["OUTOFRANGE"] - before.get("OUTOFRANGE", 0) == 3
        assert counts["FLAKY"] - before.get("FLAKY", 0) == 2
        assert scores.metrics["answer_parse_rate"] == pytest.approx(2 / 9)
        missing = reward.score([gray(1)], ["x"], [0])
        assert missing.values == [None] and "source images" in missing.errors[0]
    finally:
        reward.close()


def test_edit_judge_start_up_names_url_and_model(judge):
    port = free_port()
    with pytest.raises(RewardServerUnavailable, match=f"127.0.0.1:{port}.*EDIT_JUDGE_URL"):
        build_rewards(["edit_vlm_judge"], reward_args(f"http://127.0.0.1:{port}", reward_health_timeout=0.3))
    with pytest.raises(RewardServerUnavailable, match="--edit_judge_model_name"):
        build_rewards(["edit_vlm_judge"], reward_args(judge.url, edit_judge_model_name="Other"))


def test_edit_prompt_names_the_instruction_and_source_count():
    text = render_edit_prompt("add a hat", 2)
    assert "「add a hat」" in text and "first 2 image(s)" in text and text.rstrip().endswith("<score>X</score>")


def test_image_similarity_is_the_cosine_of_clip_image_embeddings(tiny_clip_dir):  # noqa: F811
    from transformers import AutoProcessor, CLIPModel

    reward = build_rewards(["image_similarity"], reward_args("http://127.0.0.1:1"), str(tiny_clip_dir),
                           check_ready=False)["image_similarity"]
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    sources = [[images[0]], [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), images[0]],
               [images[0]]]
    scores = reward.score(images, ["a", "b", "c"], [0, 0, 1], sources=sources)
    # Independently: CLIPModel.forward's L2-normalised image embeddings; the dot of two is their cosine.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        embeds = model(**processor(text=["x"], images=images + [sources[1][0]], return_tensors="pt")).image_embeds
    expected = [float(embeds[0] @ embeds[0]), float(embeds[1] @ embeds[3]), float(embeds[2] @ embeds[0])]
    assert scores.values == pytest.approx(expected, abs=1e-5)
    assert scores.values[0] == pytest.approx(1.0, abs=1e-5)  # an unchanged source is perfectly consistent
    assert reward.score(images[:1], ["a"], [0]).values == [None]


def test_edit_eval_set_is_generated_and_judged_over_http(judge, tmp_path):
    """An eval YAML entry with ``scoring: edit_judge``: its instructions edited by the tiny model (ODE, 2 steps, 2
    duplicates) and judged by the stand-in server; the mean equals the server's rule on the same images, and a
    judge that never answers with a score counts failed images, not zeros."""
    import torch

    from deepgen_rl.data.prompts import PromptSample
    from deepgen_rl.eval.dataset import load_eval_datasets
    from deepgen_rl.eval.edit_eval import edit_eval_seed, evaluate_edit_sets, load_edit_eval_sets
    from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, build_tiny_deepgen
    from deepgen_rl.rewards.reward_step import images_to_pil
    from deepgen_rl.sampling import generate_images
    from deepgen_rl.sampling.edit_conditioning import build_edit_conditioning

    gray(90).save(tmp_path / "src.png")
    (tmp_path / "edits.jsonl").write_text('{"instruction": "brighten it", "source_images": ["src.png"]}\n'
                                          '{"instruction": "GARBAGE please", "source_images": ["src.png"]}\n')
    (tmp_path / "eval.yaml").write_text("datasets:\n  - {name: my_edits, path: edits.jsonl, cfg_scale: 0.0, "
                                        "num_inference_steps: 2, duplicates: 2, scoring: edit_judge}\n")
    assert load_eval_datasets(tmp_path / "eval.yaml") == []  # UniGenBench skips the edit entry
    (edit_set,) = load_edit_eval_sets(tmp_path / "eval.yaml")
    model = build_tiny_deepgen(seed=0)
    reward = build_rewards(["edit_vlm_judge"], reward_args(judge.url))["edit_vlm_judge"]
    try:
        metrics = evaluate_edit_sets(model, reward, [edit_set], height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE,
                                     seed=5, output_dir=tmp_path / "out")
    finally:
        reward.close()
    sample = edit_set.prompts[0]
    with torch.no_grad():
        row = PromptSample("brighten it", "my_edits", {}, 0, sample.source_images)
        edit = build_edit_conditioning(model, [row] * 2, 1, TINY_IMAGE_SIZE ** 2)
    images = generate_images(model, ["brighten it"] * 2, num_inference_steps=2, height=TINY_IMAGE_SIZE,
                             width=TINY_IMAGE_SIZE, cfg_scale=0.0, edit=edit,
                             generator=torch.Generator().manual_seed(edit_eval_seed(5, 0)))
    source = edit.source_pil()[0][0]
    expected = [expected_score(source, image) for image in images_to_pil(images)]
    assert metrics["eval/my_edits/edit_score"] == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert metrics["eval/my_edits/judged_images"] == 2.0 and metrics["eval/my_edits/failed_images"] == 2.0
    assert (tmp_path / "out" / "edit_eval.json").is_file()


def test_eval_only_edit_judge_is_built_only_when_evaluation_runs_and_closed_with_the_trainer(judge, tmp_path):
    """The eval YAML's edit sets need the edit judge: a run whose evaluation is off (--eval_freq 0, or the
    UniGenBench judge unreachable) builds no client for them; one built for evaluation alone is closed with the
    trainer, while a training reward's client is left to the reward step."""
    from types import SimpleNamespace

    from deepgen_rl.config import DataArguments, EvalArguments, GRPOConfig, JudgeArguments
    from deepgen_rl.eval.edit_eval import edit_judge_for_eval
    from deepgen_rl.trainer.eval_hook import build_eval_hook
    from deepgen_rl.trainer.grpo_trainer import DeepGenGRPOTrainer
    from tests.servers.fake_judge import FakeJudge
    from tests.test_eval_runner import SERVED

    gray(90).save(tmp_path / "src.png")
    (tmp_path / "edits.jsonl").write_text('{"instruction": "brighten it", "source_images": ["src.png"]}\n')
    (tmp_path / "eval.yaml").write_text("datasets:\n  - {name: my_edits, path: edits.jsonl, cfg_scale: 0.0, "
                                        "num_inference_steps: 2, duplicates: 1, scoring: edit_judge}\n")
    data_args = DataArguments(eval_dataset_config=str(tmp_path / "eval.yaml"))
    built = []

    def factory(rewards=None):
        def make():
            built.append(edit_judge_for_eval(data_args.eval_dataset_config, reward_args(judge.url), rewards or {}))
            return built[-1]
        return make

    def hook_for(eval_freq: int, unigenbench_url: str, rewards=None):
        args = GRPOConfig(output_dir=str(tmp_path / "run"), eval_freq=eval_freq, report_to="none")
        judge_args = JudgeArguments(unigenbench_api_url=unigenbench_url, unigenbench_model_name=SERVED,
                                    judge_health_timeout=0.5)
        return build_eval_hook(args, data_args, judge_args, EvalArguments(), edit_judge=factory(rewards))

    assert hook_for(0, f"http://127.0.0.1:{free_port()}") is None
    assert hook_for(2, f"http://127.0.0.1:{free_port()}") is None  # judge unreachable: evaluation is off
    assert built == []
    with FakeJudge(served_model_name=SERVED) as unigenbench:
        hook = hook_for(2, unigenbench.url)
        (eval_only,) = built
        assert eval_only.owned and hook.owned_clients == [eval_only.client]
        assert not eval_only.client.chat._client.is_closed
        DeepGenGRPOTrainer.close(SimpleNamespace(reward_step=None, eval_hook=hook,
                                                 monitor=SimpleNamespace(close=lambda: None)))
        assert eval_only.client.chat._client.is_closed
        training_reward = build_rewards(["edit_vlm_judge"], reward_args(judge.url))["edit_vlm_judge"]
        try:
            shared = hook_for(2, unigenbench.url, {"edit_vlm_judge": training_reward})
            assert built[-1].client is training_reward and not built[-1].owned and shared.owned_clients == []
            shared.close()
            assert not training_reward.chat._client.is_closed
        finally:
            training_reward.close()


def test_eval_cli_evaluates_the_shipped_edit_set_with_no_unigenbench_judge(judge, tmp_path):
    """``python -m deepgen_rl.eval`` on an eval YAML of edit sets only (the shipped example edits, 2 steps instead of
    the shipped YAML's 50 to keep the test short): the tiny model edits the first example, the stand-in edit judge
    scores it, and no UniGenBench judge is asked for."""
    import json
    import os
    import subprocess

    from tests.conftest import REPO_ROOT

    before = judge.stats()["counts"].get("make the circle blue", 0)  # the first example's instruction
    edits = REPO_ROOT / "assets" / "rl_datasets" / "edit_example" / "edits.jsonl"
    config = tmp_path / "edit_eval.yaml"
    config.write_text(f"datasets:\n  - {{name: edit_example, path: {edits}, cfg_scale: 4.0, num_inference_steps: 2, "
                      "duplicates: 1, scoring: edit_judge}\n")
    out = tmp_path / "cli_out"
    result = subprocess.run(
        [sys.executable, "-m", "deepgen_rl.eval", "--tiny", "--output_dir", str(out), "--eval_dataset_config",
         str(config), "--eval_max_prompts", "1", "--edit_judge_url", judge.url, "--reward_health_timeout", "10",
         "--unigenbench_api_url", f"http://127.0.0.1:{free_port()}"],  # nobody listens: it must not be needed
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "edit_eval.json").read_text())
    assert metrics["eval/edit_example/judged_images"] == 1.0 and metrics["eval/edit_example/failed_images"] == 0.0
    assert 0.0 <= metrics["eval/edit_example/edit_score"] <= 1.0
    assert '"eval/edit_example/edit_score"' in result.stdout
    assert judge.stats()["counts"]["make the circle blue"] == before + 1  # one edit, one judge request
    assert not (out / "report.json").exists()  # no UniGenBench set: no UniGenBench report
