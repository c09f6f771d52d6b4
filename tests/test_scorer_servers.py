"""The model scorer servers (pickscore, hpsv2, image_reward, aesthetic): tiny checkpoints in the published key
layouts, written to disk and loaded through the real paths by ONE real server process hosting all four; scores
over HTTP checked against independent forwards of the original architectures (tests/scorer_reference.py)."""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deepgen_rl.rewards.http_utils import RetryPolicy, encode_png_base64
from deepgen_rl.rewards.scorer_clients import SCORER_CLIENTS, ModelScorerClient
from tests import scorer_checkpoints as ckpt
from tests import scorer_reference as ref
from tests.reward_servers import ServerProcess, free_port

pytestmark = pytest.mark.timeout(180)

NAMES = ("pickscore", "hpsv2", "image_reward", "aesthetic")
PROMPTS = ["a red cat", "a photo of the green sign " * 6, "a blue dog"]  # the second is cut at the context length
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return ckpt.write_all(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="module")
def server(files):
    port = free_port()
    argv = [sys.executable, "-m", "deepgen_rl.rewards.servers.serve", *NAMES, "--host", "127.0.0.1", "--port",
            str(port), "--device", "cpu", "--batch-size", "2", "--log-level", "warning"]
    with ServerProcess(argv, port, env={**os.environ, **files}).start(timeout_s=150) as srv:
        yield srv


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in PROMPTS]


def expected_scores(name: str, files: dict[str, str], images: list[Image.Image]) -> list[float]:
    """What the published model computes, from the original checkpoint layout (independent of our mapping)."""
    from transformers import AutoProcessor, CLIPModel

    if name == "pickscore":  # PickScore ships in transformers' CLIP format: logits_per_image = exp(scale) * cos
        model = CLIPModel.from_pretrained(files["PICKSCORE_MODEL_PATH"]).eval()
        inputs = AutoProcessor.from_pretrained(files["PICKSCORE_MODEL_PATH"])(
            text=PROMPTS, images=images, return_tensors="pt", padding=True, truncation=True, max_length=24)
        with torch.no_grad():
            return model(**inputs).logits_per_image.diagonal().tolist()
    if name == "aesthetic":
        model = CLIPModel.from_pretrained(files["AESTHETIC_CLIP_PATH"]).eval()
        pixels = AutoProcessor.from_pretrained(files["AESTHETIC_CLIP_PATH"])(images=images, return_tensors="pt")
        with torch.no_grad():
            embeds = model(**pixels, input_ids=torch.zeros(len(images), 1, dtype=torch.long)).image_embeds
        return ref.linear_head(torch.load(files["AESTHETIC_MLP_PATH"]), embeds).tolist()
    if name == "hpsv2":
        state = torch.load(files["HPSV2_CHECKPOINT"])["state_dict"]
        processor = AutoProcessor.from_pretrained(files["HPSV2_PROCESSOR_PATH"])
        tokens = processor.tokenizer(PROMPTS, padding=True, truncation=True, max_length=ckpt.OC_CONTEXT,
                                     return_tensors="pt")["input_ids"]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return (F.normalize(ref.open_clip_image(state, pixels, heads=2), dim=-1)
                * F.normalize(ref.open_clip_text(state, tokens, heads=2), dim=-1)).sum(-1).tolist()
    from transformers import AutoTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    state = torch.load(files["IMAGEREWARD_CHECKPOINT"])
    tokenizer = AutoTokenizer.from_pretrained(files["IMAGEREWARD_TOKENIZER_PATH"])
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    size = ckpt.BLIP_IMAGE  # BLIP's transform: bicubic resize of the short side, centre crop, CLIP mean / std
    pixels = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})(
        images=images, return_tensors="pt")["pixel_values"]
    return ref.image_reward(state, pixels, tokens["input_ids"], tokens["attention_mask"], heads=2).tolist()


def client(server, name: str) -> ModelScorerClient:
    return ModelScorerClient(SCORER_CLIENTS[name], f"{server.url}/{name}", RetryPolicy(60.0, 1, 0.01),
                             max_concurrency=2, request_batch_size=2, health_timeout_s=10.0)


@pytest.mark.parametrize("name", NAMES)
def test_each_scorer_scores_a_batch_over_http_as_the_published_model(server, files, images, name):
    reward = client(server, name)
    try:
        reward.check_ready()
        scores = reward.score(images, PROMPTS, [0, 0, 1])
    finally:
        reward.close()
    assert scores.num_failed == 0, scores.errors
    assert scores.metrics["requests"] == 2  # 3 images in requests of 2
    assert all(np.isfinite(scores.values))
    low, high = SCORER_CLIENTS[name].score_range
    assert all(low <= v <= high for v in scores.values)
    assert scores.values == pytest.approx(expected_scores(name, files, images), abs=1e-4)
    assert len(set(np.round(scores.values, 6))) == len(images)  # a real score per image, not a constant


@pytest.mark.parametrize("name", NAMES)
def test_a_malformed_item_gets_400_naming_it(server, images, name):
    items = [{"image": encode_png_base64(images[0]), "prompt": "a red cat"},
             {"image": base64.b64encode(b"not a png").decode(), "prompt": "a red cat"},
             {"image": encode_png_base64(images[1])}]
    response = httpx.post(f"{server.url}/{name}/score", json={"items": items}, timeout=30)
    assert response.status_code == 400
    assert [e["loc"] for e in response.json()["errors"]] == ["items[2].prompt"]  # the contract is checked first
    response = httpx.post(f"{server.url}/{name}/score", json={"items": items[:2]}, timeout=30)
    assert response.status_code == 400
    assert [e["loc"] for e in response.json()["errors"]] == ["items[1].image"]
    assert "items[1].image" in response.json()["detail"]


def test_one_process_hosts_the_four_and_counts_their_work(server):
    assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok", "engine": ",".join(NAMES)}
    for name in NAMES:
        assert httpx.get(f"{server.url}/{name}/health", timeout=5).json()["engine"] == name
    assert httpx.post(server.url + "/score", json={"items": []}, timeout=5).status_code in (404, 405)
    before = httpx.get(f"{server.url}/aesthetic/stats", timeout=5).json()
    items = [{"id": f"i{i}", "image": encode_png_base64(Image.new("RGB", (32, 32), (i, 0, 0))), "prompt": ""}
             for i in range(3)]
    reply = httpx.post(f"{server.url}/aesthetic/score", json={"items": items}, timeout=30)
    assert reply.status_code == 200
    assert [r["id"] for r in reply.json()["results"]] == ["i0", "i1", "i2"]  # each result echoes its item's id
    after = httpx.get(f"{server.url}/aesthetic/stats", timeout=5).json()
    # 3 images in model batches of 2: counted as images, not as batches
    assert after["images_scored"] - before["images_scored"] == 3
    assert after["requests_completed"] - before["requests_completed"] == 1 and after["queue_depth"] == 0


class StubScorer:
    name = "stub"

    def __init__(self, values=None, error=None):
        self.values, self.error = values, error

    def score_batch(self, images, prompts):
        if self.error:
            raise self.error
        return self.values


def test_a_failing_batch_or_a_non_finite_score_fails_only_its_items():
    from deepgen_rl.rewards.servers.scorer_app import score_one_batch

    batch = ([Image.new("RGB", (8, 8))] * 3, ["a", "b", "c"])
    results = score_one_batch(StubScorer(values=[0.5, float("nan"), -2.0]), batch)
    assert [r.score for r in results] == [0.5, None, -2.0]
    assert "non-finite score (nan)" in results[1].error and results[0].error is None
    results = score_one_batch(StubScorer(error=RuntimeError("CUDA out of memory")), batch)
    assert all(r.score is None and "stub failed: RuntimeError: CUDA out of memory" in r.error for r in results)
    results = score_one_batch(StubScorer(values=[1.0]), batch)
    assert all("returned 1 scores for 3 images" in r.error for r in results)


# ---------- the key mappings, in-process ----------

def test_the_open_clip_and_image_reward_layouts_load_with_nothing_missing_or_left_over(files, caplog):
    from deepgen_rl.rewards.servers.scorers.hpsv2 import load_hpsv2_model
    from deepgen_rl.rewards.servers.scorers.image_reward import load_image_reward_model

    hps = load_hpsv2_model(files["HPSV2_CHECKPOINT"], ckpt.clip_processor().tokenizer)
    state = torch.load(files["HPSV2_CHECKPOINT"])["state_dict"]
    n_params = sum(p.numel() for p in hps.parameters())
    assert n_params == sum(v.numel() for k, v in state.items() if k != "attn_mask")  # every tensor used, once
    assert hps.config.vision_config.num_attention_heads == 2 and hps.config.text_config.num_attention_heads == 2
    with caplog.at_level("INFO", logger="deepgen_rl.scorer_server"):
        reward_model = load_image_reward_model(files["IMAGEREWARD_CHECKPOINT"])
    state = torch.load(files["IMAGEREWARD_CHECKPOINT"])
    used = {k: v for k, v in state.items() if not k.startswith(("blip.vision_proj", "blip.text_proj"))
            and not k.endswith("position_ids")}
    assert sum(p.numel() for p in reward_model.parameters()) == sum(v.numel() for v in used.values())
    assert "4 checkpoint tensors the score does not use were skipped" in caplog.text  # the two ITC projections


def test_a_checkpoint_missing_a_key_or_with_an_unknown_one_is_refused_by_name(files, tmp_path):
    from deepgen_rl.rewards.servers.scorers.hpsv2 import load_hpsv2_model
    from deepgen_rl.rewards.servers.scorers.image_reward import load_image_reward_model

    state = torch.load(files["HPSV2_CHECKPOINT"])["state_dict"]
    tokenizer = ckpt.clip_processor().tokenizer
    for edit, message in ((lambda s: s.pop("visual.ln_post.bias"), "missing vision_model.post_layernorm.bias"),
                          (lambda s: s.__setitem__("visual.transformer.resblocks.0.ls_1.gamma", torch.ones(160)),
                           "visual.transformer.resblocks.0.ls_1.gamma")):
        broken = dict(state)
        edit(broken)
        torch.save({"state_dict": broken}, tmp_path / "hps.pt")
        with pytest.raises(ValueError, match=message):
            load_hpsv2_model(str(tmp_path / "hps.pt"), tokenizer)
    broken = torch.load(files["IMAGEREWARD_CHECKPOINT"])
    broken.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight")
    torch.save(broken, tmp_path / "ir.pt")
    with pytest.raises(ValueError, match="missing text_encoder.encoder.layer.1.crossattention.self.key.weight"):
        load_image_reward_model(str(tmp_path / "ir.pt"))


def test_missing_paths_fail_at_start_up_naming_the_variable(files, tmp_path):
    from deepgen_rl.rewards.servers import serve

    with pytest.raises(SystemExit, match="HPSV2_CHECKPOINT.*is not a file"):
        serve.main(["hpsv2", "--hpsv2-checkpoint", str(tmp_path / "nope.pt"),
                    "--hpsv2-processor-path", files["HPSV2_PROCESSOR_PATH"], "--device", "cpu"])
    with pytest.raises(SystemExit, match="AESTHETIC_MLP_PATH"):
        serve.main(["aesthetic", "--aesthetic-mlp-path", "", "--aesthetic-clip-path", files["AESTHETIC_CLIP_PATH"],
                    "--device", "cpu"])
    with pytest.raises(SystemExit, match="needs --port"):
        serve.main(["pickscore", "hpsv2"])


# ---------- the launcher ----------

def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_PORT")}
    return subprocess.run(["bash", str(SCRIPTS / "reward_server.sh"), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_launcher_ports_names_and_delegation():
    for name, spec in SCORER_CLIENTS.items():
        argv = shlex.split(run_script(name, "--dry-run", "--batch-size", "4", PYTHON=sys.executable).stdout)
        assert argv[:4] == [sys.executable, "-m", "deepgen_rl.rewards.servers.serve", name]
        assert argv[argv.index("--port") + 1] == str(spec.port)  # the port training's URL defaults to
        assert argv[-2:] == ["--batch-size", "4"]
    assert len({spec.port for spec in SCORER_CLIENTS.values()} | {18082, 18087, 8000}) == 7  # no port shared
    argv = shlex.split(run_script("image_reward", "--dry-run", IMAGE_REWARD_PORT="19001").stdout)
    assert argv[argv.index("--port") + 1] == "19001"
    ocr = shlex.split(run_script("ocr", "--dry-run", OCR_PORT="18555").stdout)
    assert "deepgen_rl.rewards.servers.ocr" in ocr and ocr[ocr.index("--port") + 1] == "18555"
    bad = run_script("hps", "--dry-run")
    assert bad.returncode != 0 and "pickscore hpsv2 image_reward aesthetic ocr" in bad.stderr
    bad = run_script("aesthetic", "--dry-run", AESTHETIC_PORT="http")
    assert bad.returncode != 0 and "AESTHETIC_PORT" in bad.stderr


def test_launcher_starts_a_single_scorer_served_at_the_root(files, images):
    port = free_port()
    env = {**os.environ, **files, "AESTHETIC_PORT": str(port), "REWARD_SERVER_HOST": "127.0.0.1",
           "PYTHON": sys.executable}
    argv = ["bash", str(SCRIPTS / "reward_server.sh"), "aesthetic", "--device", "cpu", "--log-level", "warning"]
    with ServerProcess(argv, port, env=env).start(timeout_s=150) as server:
        assert httpx.get(server.url + "/health", timeout=5).json()["engine"] == "aesthetic"
        reward = client(server, "aesthetic")
        reward.url = server.url  # one scorer: its URL is the bare host:port
        try:
            scores = reward.score(images, PROMPTS, [0, 1, 2])
        finally:
            reward.close()
    assert scores.values == pytest.approx(expected_scores("aesthetic", files, images), abs=1e-4)
