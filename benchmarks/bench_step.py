"""A whole GRPO step on the tiny model: streamed vs serial rewards, and SDE-window vs full training (issue 12).

    python benchmarks/bench_step.py                     # latency per request set from the measured rollout
    python benchmarks/bench_step.py --latency-ms 120    # or fixed

One process runs the real trainer (DeepSpeed ZeRO-2 on CPU, gloo group of one) on the tiny DeepGen model, against
a stand-in reward server on 127.0.0.1 (its own process, our OCR contract) that serves ONE request at a time,
each after ``--latency-ms``, like a reward model saturated by the batch: its throughput, not its concurrency,
bounds the reward phase. Default: the latency is set from warm-up steps so that the serial reward phase lasts
about as long as the rollout (one image per request; 8 images in 4 rollout micro-batches of one group of
rollout_n 2 each).
Measured side by side in one run, alternating, each figure a mean over ``--repeats`` steps:

* ``ratio``: time/reward_wait of streamed steps (the scoring left exposed after the rollout) over time/rewards of
  serial steps (the whole reward phase). Target <= 0.35: only the last micro-batch's scoring stays exposed.
  Clock: wall (time.perf_counter, the trainer's PhaseTimer), since it measures waiting on a server.
* ``window_ratio``: the train phase with --sde_window_size 2 (both window steps trained) over the train phase with
  30 of 50 steps (guide defaults: CPS-SDE, beta 5e-7, SFT-aux, --optimizer_step_schedule reference). Target
  <= 0.12. Clock: this process's CPU time (time.process_time, all threads), steadier than wall time on a shared
  machine; the wall-clock ratio is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI resolves the endpoint's annotations here)

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_YAML = REPO_ROOT / "assets" / "rl_datasets" / "quickstart" / "quickstart.yaml"
ZERO2 = REPO_ROOT / "scripts" / "deepspeed" / "zero2.json"
REWARD = "jpeg_compressibility"  # the quick-start dataset's reward name, scored here by the stand-in server


def serve_stand_in(port: int, latency_s: float) -> None:
    """The stand-in server (its own process): one request at a time, each answered after ``latency_s``."""
    import uvicorn

    from deepgen_rl.rewards.protocol import OcrItemResult, OcrScoreRequest, OcrScoreResponse

    app = FastAPI()
    busy = asyncio.Lock()

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "stand-in"}

    @app.post("/score")
    async def score(request: Request):
        parsed = OcrScoreRequest.model_validate_json(await request.body())
        async with busy:
            await asyncio.sleep(latency_s)
        results = [OcrItemResult(id=item.id, score=0.5, recognized_text="", targets=["x"]) for item in parsed.items]
        return OcrScoreResponse(results=results, engine="stand-in").model_dump()

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def build_trainer(tiny, out: Path, **overrides):
    """The entry point's own trainer on the tiny model (guide defaults but sizes; reward attached later)."""
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.config import parse_args

    values = {"image_height": 64, "image_width": 64, "num_inference_steps": 50, "rollout_n": 2,
              "global_batch_size": 8, "rollout_micro_batch_size": 2, "atrain_micro_batch_size": 8,
              "eval_freq": 0, "sample_image_freq": 0, "report_to": "none", "save_strategy": "no",
              "gradient_checkpointing": False, "seed": 0, "max_steps": 1000, "dataset_config": str(QUICKSTART_YAML),
              "deepspeed": str(ZERO2), "output_dir": str(out), "sd3_model_name_or_path": str(tiny.sd3_dir),
              "qwen2_5_vl_model_name_or_path": str(tiny.qwen_dir), "checkpoint": str(tiny.checkpoint),
              "disable_tqdm": True, **overrides}
    flags = list(tiny.model_flags()) + [part for k, v in values.items() for part in (f"--{k}", str(v))]
    args, *groups = parse_args(flags)
    return grpo_deepgen.build_trainer(args, *groups, "cpu")


def attach_server(trainer, url: str) -> None:
    """Score the trainer's reward with the stand-in at ``url``: one image per request, all requests in flight."""
    from deepgen_rl.rewards.http_utils import RetryPolicy
    from deepgen_rl.rewards.ocr_client import OcrRewardClient
    from deepgen_rl.rewards.reward_step import RewardStep

    trainer.reward_step.close()
    client = OcrRewardClient(url, RetryPolicy(timeout_s=600.0, max_retries=0, backoff_s=0.0), max_concurrency=16,
                             request_batch_size=1, health_timeout_s=60.0)
    trainer.reward_step = RewardStep({REWARD: client})


def one_step(trainer, stream: bool) -> dict[str, float]:
    """One GRPO step; its phase times (wall) plus the train phase's CPU seconds."""
    trainer.args.stream_rewards = stream  # read by every rollout phase
    train_phase = trainer.train_phase
    cpu = {}

    def timed_train_phase(*args, **kwargs):
        started = time.process_time()
        try:
            return train_phase(*args, **kwargs)
        finally:
            cpu["train"] = time.process_time() - started

    trainer.train_phase = timed_train_phase
    try:
        metrics, _, rewards = trainer.training_step()
    finally:
        del trainer.train_phase
    trainer.state.global_step += 1
    if int(rewards.failed.sum()):
        raise SystemExit(f"{int(rewards.failed.sum())} rewards failed, e.g. {rewards.failures[0].message}")
    times = trainer.timer.pop()
    return {**times, "cpu/train": cpu["train"], "steps": metrics.get("train/optimizer_steps", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="stand-in latency per request (default: serial reward phase ~ the measured rollout)")
    parser.add_argument("--repeats", type=int, default=1, help="measured steps per variant")
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-latency-s", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_port:
        serve_stand_in(options.serve_port, options.serve_latency_s)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from deepgen_rl import grpo_deepgen
    from deepgen_rl.model.tiny import save_tiny_deepgen
    from tests.reward_servers import ServerProcess, free_port

    torch.manual_seed(0)
    grpo_deepgen.ensure_single_process_env(os.environ)
    grpo_deepgen._init_distributed()
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    tiny = save_tiny_deepgen(work / "tiny", seed=0)
    full = build_trainer(tiny, work / "full")
    # Both window steps trained: a range ending before T (a window holding the last step trains W - 1).
    window = build_trainer(tiny, work / "window", sde_window_size=2, sde_window_range="0,49", timestep_fraction=1.0)
    requests = full.args.global_batch_size  # one image per request, one rank

    # Warm-up (not measured): a serial step against an instant server, whose rollout sets the default latency.
    port = free_port()
    with ServerProcess([sys.executable, __file__, "--serve-port", str(port), "--serve-latency-s", "0"], port) as srv:
        for trainer in (full, window):
            attach_server(trainer, srv.url)
        warm = [one_step(full, stream=False), one_step(window, stream=False)]
    # The faster of the two warm-up rollouts (same cost: T = 50 DiT forwards of 8 images each; the first step of a
    # process carries one-off costs): the serial reward phase then lasts about one rollout.
    rollout_s = min(run["time/rollout"] for run in warm)
    latency_s = options.latency_ms / 1000 if options.latency_ms is not None else rollout_s / requests

    port = free_port()
    server = ServerProcess([sys.executable, __file__, "--serve-port", str(port), "--serve-latency-s",
                            str(latency_s)], port)
    serial, streamed, windowed = [], [], []
    with server:
        for trainer in (full, window):
            attach_server(trainer, server.url)
        for _ in range(options.repeats):  # alternating, so load changes on the machine hit both sides alike
            serial.append(one_step(full, stream=False))
            streamed.append(one_step(full, stream=True))
            windowed.append(one_step(window, stream=True))
    for trainer in (full, window):
        trainer.close()

    def mean(runs, key):
        return statistics.fmean(run[key] for run in runs)

    print(f"tiny DeepGen, 64x64, T = 50, 8 images/step in 4 rollout micro-batches of one group (rollout_n 2); "
          f"stand-in: one request at a time, {latency_s * 1000:.0f} ms each, 1 image/request; {options.repeats} "
          f"steps per variant")
    print(f"rollout (wall): serial {mean(serial, 'time/rollout'):.2f} s, streamed {mean(streamed, 'time/rollout'):.2f} s "
          f"(streamed includes decoding and submitting each micro-batch)")
    print(f"serial reward phase (wall): {mean(serial, 'time/rewards'):.2f} s; streamed reward wait (wall): "
          f"{mean(streamed, 'time/reward_wait'):.2f} s")
    serial_total = sum(mean(serial, f"time/{phase}") for phase in ("rollout", "decode", "rewards"))
    streamed_total = mean(streamed, "time/rollout") + mean(streamed, "time/reward_wait")
    print(f"rollout to advantages (wall): serial {serial_total:.2f} s, streamed {streamed_total:.2f} s")
    print(f"train phase, 30 of 50 steps ({mean(streamed, 'steps'):.0f} optimizer steps): "
          f"{mean(serial + streamed, 'cpu/train'):.2f} s CPU, {mean(serial + streamed, 'time/train'):.2f} s wall; "
          f"SDE window W = 2 ({mean(windowed, 'steps'):.0f} optimizer steps): {mean(windowed, 'cpu/train'):.2f} s CPU, "
          f"{mean(windowed, 'time/train'):.2f} s wall")
    print(f"window_ratio (wall clock): {mean(windowed, 'time/train') / mean(serial + streamed, 'time/train'):.3f}")
    print(f"ratio: {mean(streamed, 'time/reward_wait') / mean(serial, 'time/rewards'):.3f}")
    print(f"window_ratio: {mean(windowed, 'cpu/train') / mean(serial + streamed, 'cpu/train'):.3f}")


if __name__ == "__main__":
    main()
