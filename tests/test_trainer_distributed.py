"""Two real processes (torchrun, gloo on 127.0.0.1, DS_ACCELERATOR=cpu) train the tiny DeepGen model for 2 GRPO
steps under DeepSpeed ZeRO-2 and ZeRO-3, through the real entry point code (tests/trainer_utils.py wraps
deepgen_rl.grpo_deepgen and dumps a SHA-256 of every parameter before and after training).

Checked: every trainable parameter changed and every frozen one did not (ZeRO-2: the DiT; ZeRO-3: DiT +
connector + meta queries + LLM with gradient checkpointing, which also exercises meta_queries under parameter
partitioning); the first chunk's ratio is 1; the checkpoint-N layout; metrics, sample grids and offline wandb /
swanlab runs. The ZeRO-3 run has the sharded EMA (its evaluation and sample grid swap it in) and also evaluates at
step 2 against the stand-in UniGenBench judge, with shares that need padding to stay in step.
"""

from __future__ import annotations

import csv
import json

import torch

from tests.servers.fake_judge import FakeJudge
from tests.test_eval_runner import SERVED, write_bench
from tests.trainer_utils import REPO_ROOT, ZERO2, ZERO3, run_env, tiny_run_flags, torchrun

SCRIPT = str(REPO_ROOT / "tests" / "trainer_utils.py")
TIMEOUT_S = 400


def _launch(tiny_paths, tmp_path, deepspeed_config, **overrides):
    out = tmp_path / "run"
    dump = tmp_path / "params.json"
    env = run_env(tiny_paths)
    for name in ("WANDB_MODE", "SWANLAB_MODE"):  # the entry point's default (offline) must apply
        env.pop(name, None)
    flags = tiny_run_flags(tiny_paths, out, deepspeed=str(deepspeed_config), max_steps=2, **overrides)
    result = torchrun(2, [SCRIPT, "--param_dump", str(dump), *flags], env, TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, json.loads(dump.read_text())


def _changed(dump) -> tuple[dict[str, bool], dict[str, bool]]:
    trainable = {n: d["sha256"] != dump["after"][n]["sha256"] for n, d in dump["before"].items() if d["trainable"]}
    frozen = {n: d["sha256"] != dump["after"][n]["sha256"] for n, d in dump["before"].items() if not d["trainable"]}
    return trainable, frozen


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero2_dit_two_steps_checkpoint_and_logs(tiny_paths, tmp_path):
    # --ema_decay: the sharded EMA's checkpoint gather (a collective of both ranks) writes ema.pt
    out, dump = _launch(tiny_paths, tmp_path, ZERO2, trainable_modules="dit", save_strategy="steps", save_steps=2,
                        sample_image_freq=1, report_to="wandb,swanlab", ema_decay=0.9)
    assert dump["steps"] == 2
    trainable, frozen = _changed(dump)
    # The whole DiT but the text-stream query of its last (context_pre_only) block, whose outputs SD3 discards.
    dead = {f"transformer.transformer_blocks.1.attn.add_q_proj.{kind}" for kind in ("weight", "bias")}
    assert set(trainable) == {n for n in dump["before"] if n.startswith("transformer.")} - dead
    assert all(trainable.values()), [n for n, c in trainable.items() if not c]
    assert not any(frozen.values()), [n for n, c in frozen.items() if c]

    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["train/step_applied"] == 1.0 and m["reward/num_samples"] == 8.0  # 2 ranks x 1 prompt x 4
        assert m["policy/first_chunk_ratio_max_dev"] <= 1e-6  # rollout and recompute agree: ratio 1
        for key in ("loss/policy", "loss/kl", "loss/sft", "reward/jpeg_compressibility/mean", "adv/std",
                    "adv/zero_variance_group_fraction", "policy/clip_fraction", "reward/failed_samples",
                    "time/rollout", "time/reward_wait", "time/advantages", "time/train"):  # rewards streamed (default)
            assert key in m, key
    assert (out / "samples" / "step_000002.png").is_file() and (out / "reward_curve.png").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "wandb did not log offline by default"
    assert list((out / "swanlog").iterdir()), "swanlab did not log offline by default"

    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "latest").read_text().strip() == "global_step2"
    for name in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth", "global_step2/mp_rank_00_model_states.pt",
                 "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert (checkpoint / name).is_file(), name
    assert not list(out.glob("tmp-checkpoint-*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["prompt_sampler"]["batches_drawn"] == 2
    assert state["sftaux_sampler"]["batches_drawn"] == 2 and len(state["log_history"]) == 2
    module = torch.load(checkpoint / "global_step2" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    # DeepGenModel state-dict names; every trainable weight in, every frozen one out (buffers ride along).
    assert set(trainable) <= set(module) and not set(frozen) & set(module)
    assert all(name.startswith("transformer.") for name in module)
    # ema.pt: whole fp32 tensors of every trained parameter (each rank averaged its half of the fp32 masters).
    ema = torch.load(checkpoint / "ema.pt", map_location="cpu", weights_only=True)
    assert ema["optimizer_steps"] == ema["num_updates"] == sum(m["train/optimizer_steps"] for m in metrics)
    assert set(ema["shadow"]) == {n for n, d in dump["before"].items() if d["trainable"]}
    for name, tensor in ema["shadow"].items():
        assert tensor.dtype == torch.float32 and tensor.shape == module[name].shape, name


def _two_dataset_bench(folder) -> str:
    """Eval YAML: 'three' (3 prompts; images 0-2) and 'one' (1 prompt; image 3). Over 2 ranks rank 0 gets images
    0 and 2 (one batch of 'three'), rank 1 images 1 and 3 (one batch of each): rank 0 must run a padding batch of
    'one' or the ZeRO-3 gathers of rank 1's second generation would wait for it forever."""
    write_bench(folder, steps=2, duplicates=1, name="three")
    with (folder / "one.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "prompt", "sub_dims"])
        writer.writerow([0, "a blue vase", json.dumps({"Primary Categories": "Art", "Testpoints": ["Style", "Layout"],
                                                      "Testpoint Description": ["style", "layout"]})])
    text = (folder / "eval.yaml").read_text(encoding="utf-8")
    (folder / "eval.yaml").write_text(text + "  - {name: one, path: one.csv, cfg_scale: 4.0, num_inference_steps: 2, "
                                      "duplicates: 1, scoring: unigenbench/en}\n", encoding="utf-8")
    return str(folder / "eval.yaml")


def test_zero3_dit_connector_llm_two_steps_and_eval(tiny_paths, tmp_path):
    # The judge passes every "Style" test point only: 'three' has 2 of 8 such points, 'one' 1 of 2.
    with FakeJudge(rule="name", pass_dims="Style", served_model_name=SERVED) as judge:
        out, dump = _launch(tiny_paths, tmp_path, ZERO3, trainable_modules="dit_connector_llm",
                            gradient_checkpointing=True, eval_freq=2, unigenbench_api_url=judge.url,
                            # the sharded EMA under ZeRO-3 (once refused): evaluated with it, and every rank
                            # takes part in the EMA's sample grid (its forwards gather the partitioned weights)
                            ema_decay=0.5, sample_image_freq=2,
                            eval_before_train=False,  # one evaluation (step 2) is enough here; step 0's is tested in-process
                            eval_dataset_config=_two_dataset_bench(tmp_path / "bench"))
        assert judge.stats()["counts"]["chat"] == 4  # the 4 real images; padding is generated, never judged
    trainable, frozen = _changed(dump)
    assert all(trainable.values()), [n for n, c in trainable.items() if not c]
    assert not any(frozen.values()), [n for n, c in frozen.items() if c]
    assert "meta_queries" in trainable and any(n.startswith("connector.") for n in trainable)
    llm = [n for n in trainable if n.startswith("lmm.model.language_model.")]
    assert llm and "lmm.model.language_model.embed_tokens.weight" in llm
    # Parts text-to-image never reaches: the VAE stays frozen; the vision tower is dropped before DeepSpeed
    # (model/vision_tower.py), so it holds no parameters at all.
    assert any(n.startswith("vae.") for n in frozen)
    assert not any(n.startswith("lmm.model.visual.") for n in dump["before"])
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["policy/first_chunk_ratio_max_dev"] <= 1e-6 for m in metrics)
    assert not (out / "checkpoint-2").exists()  # --save_strategy no
    assert (out / "samples" / "step_000002.png").is_file()  # the EMA's grid
    evaluated = metrics[1]  # step 2: the ranks' generation forwards stayed in step under ZeRO-3
    assert "eval/failed" not in evaluated and evaluated["eval/complete"] == 1.0
    assert evaluated["eval/three/overall"] == 2 / 8 and evaluated["eval/one/overall"] == 1 / 2
    assert evaluated["eval/three/judged_images"] == 3 and evaluated["eval/one/judged_images"] == 1
    # One EMA update per optimizer step (the default reference schedule takes several per GRPO step); the
    # evaluation above ran with it swapped in, and training went on after it (the step-2 weights changed).
    assert metrics[0]["ema/updates"] == metrics[0]["train/optimizer_steps"] > 0
    assert metrics[1]["ema/updates"] == metrics[0]["train/optimizer_steps"] + metrics[1]["train/optimizer_steps"]
    assert not any(key.startswith("eval/") for key in metrics[0])
