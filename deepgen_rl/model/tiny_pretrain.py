"""Pretraining of the tiny DeepGen model on the synthetic prompt -> image task (deepgen_rl/rewards/synthetic.py).

    python -m deepgen_rl.model.tiny --output_dir outputs/tiny_pretrained --pretrain_steps 2000

Two phases, on the single-object prompts of the synthetic grammar (``max_objects``) and their exact renderings:

1. VAE: the tiny VAE is random (model/tiny.py), so decode(encode(image)) is not the image and no DiT could
   produce a prompted picture. ``vae_steps`` of reconstruction loss ||decode(encode(image)) - image||^2 make it
   a deterministic autoencoder (its posterior pinned to its mode); then ``shift_factor`` / ``scaling_factor``
   are set from the latents' mean and std, as SD3's are, so the DiT sees unit-scale latents.
2. DiT + connector: ``steps`` of the SFT-aux flow-matching loss (trainer/objective.py, the loss the GRPO trainer
   adds with --sft_aux_coef) on a DiT bigger than the untrained test model's (``dit_*``) and on the connector
   path at a higher lr, the LLM frozen.

The result is saved in the real layouts (``save_deepgen_parts``) like the untrained tiny model, with a
``pretrain.json`` beside it (settings, final losses, ``conditional_gap``) that makes a second call with the same
settings reuse the folder.

Measured (defaults, seed 0, 2 threads of this repo's 2-core CI machine: 207 s): VAE reconstruction MSE 0.0067
in [0, 1] units; flow-matching loss 0.152; loss with each rendering's own prompt 0.10 vs another prompt's 1.36;
synthetic_match of 4-step CPS samples (8 quick-start prompts x 8, fixed noise) 0.595, against ~0.02 for the
untrained model. The samples are recognisably the prompted colour and shape in the prompted half, with smudges,
stray blobs and some shapes off, so GRPO has room (docs/quickstart.md#quick-start). The shipped model
(assets/tiny_pretrained, same defaults, 1 thread): flow-matching loss 0.154, own prompt 0.117 vs another's 1.125,
synthetic_match 0.486 on the quick start's fixed-noise grid; its pretrain.json records the loss curves.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from deepgen_rl.rewards.synthetic import all_prompts, render_prompt

logger = logging.getLogger(__name__)
PRETRAIN_RECORD = "pretrain.json"
CURVE_EVERY = 10  # steps per point of the recorded loss curves


@dataclass(frozen=True)
class PretrainSettings:
    """steps: flow-matching steps; vae_steps: autoencoder steps; batch_size: images per step; lr: AdamW lr of the
    DiT; conditioning_lr: AdamW lr of the connector and projectors; max_objects: objects per pretraining prompt
    (1: "a <colour> <shape> on the <position>", the 32 single-object prompts); dit_*: the pretrained DiT's size
    (model/tiny.py ``TinyDiTSize``)."""

    steps: int = 2000
    vae_steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    conditioning_lr: float = 3e-3
    vae_lr: float = 1e-2
    max_objects: int = 1
    seed: int = 0
    image_size: int = 64
    dit_layers: int = 4
    dit_heads: int = 4
    dit_head_dim: int = 32

    def __post_init__(self) -> None:
        for name in ("steps", "vae_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--pretrain_{name} must be >= 0; got {getattr(self, name)}.")
        for name in ("batch_size", "image_size", "lr", "conditioning_lr", "vae_lr", "dit_layers", "dit_heads",
                     "dit_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pretraining {name} must be positive; got {getattr(self, name)}.")
        if self.max_objects not in (1, 2):
            raise ValueError(f"pretraining max_objects must be 1 or 2; got {self.max_objects}.")


def rendered_batch(prompts: list[str], size: int) -> torch.Tensor:
    """prompts (n) -> their exact renderings [n, 3, size, size] float in [0, 1]."""
    arrays = [np.asarray(render_prompt(p, size, size), dtype=np.float32) / 255.0 for p in prompts]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _draw_prompts(rng: np.random.Generator, prompts: list[str], n: int) -> list[str]:
    return [prompts[int(i)] for i in rng.integers(len(prompts), size=n)]


def pin_posterior_to_its_mode(vae) -> None:
    """Make ``vae.encode(x).latent_dist.sample()`` equal its mode: the log-variance half of the encoder's output
    becomes the constant -30 (diffusers' lower clamp; std exp(-15) ~ 3e-7).

    WHY: the random tiny encoder's posterior std is ~0.4, as large as the latents' spread across prompts; the
    SFT-aux loss encodes with ``sample()``, so the DiT would be asked to predict that noise and its prompt
    conditioning would only ever explain a small part of the loss (measured: right vs shuffled prompt 1.451 vs
    1.457 after 200 steps)."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


def loss_curve(losses: list[float], every: int = CURVE_EVERY) -> list[float]:
    """Means of consecutive blocks of ``every`` step losses (the last block may be shorter), rounded to 6 digits:
    the recorded curve a re-pretraining is compared with (tests/test_tiny_pretrain_curve.py)."""
    return [round(float(np.mean(losses[i:i + every])), 6) for i in range(0, len(losses), every)]


def pretrain_vae(vae, settings: PretrainSettings, prompts: list[str],
                 losses: list[float] | None = None) -> float:
    """Train ``vae`` as a deterministic autoencoder of the renderings (its posterior pinned to its mode), then set
    its latent shift/scale; returns the final reconstruction loss (MSE in [-1, 1] pixel units). ``losses``, when
    given, receives every step's loss.

    Every step sees all the renderings (32 single-object ones) and the lr decays linearly to 0: measured (seed 0,
    200 steps) MSE 0.008 in [0, 1] units, against 0.007-0.016 from random batches of 16 at a constant lr, which
    left the samples' colours visibly off (orange for red, teal for green)."""
    vae.requires_grad_(True).train()
    pin_posterior_to_its_mode(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.vae_steps)
    images = rendered_batch(prompts, settings.image_size) * 2 - 1
    for step in tqdm(range(settings.vae_steps), desc="pretraining the tiny VAE", unit="step", mininterval=2.0):
        loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if losses is not None:
            losses.append(loss.item())
    pin_posterior_to_its_mode(vae)  # the optimizer moved the (unused) log-variance rows
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, images)
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))
    logger.info("VAE reconstruction loss after %d steps: %.4f", settings.vae_steps, loss.item())
    return float(loss.item())


class FrozenLLMStates:
    """The frozen LLM's fused states of each prompt, computed once per (prompt, padded length).

    WHY per padded length: prompts are left-padded to the longest of their batch and the (unmasked) connector and
    DiT see the pad positions, so a prompt's conditioning depends on its batch's longest prompt. A prompt's states
    at a given padded length do not depend on the other prompts (the LLM masks the pads and numbers positions
    from the first real token), so caching them per length gives what ``model.encode_prompt`` would compute,
    without running the LLM (a third of a step's time) at every step."""

    def __init__(self, model) -> None:
        self.model = model
        self.states: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """captions (n) -> fused states [n, P+Q, F * D_llm], P the longest caption's token count."""
        texts = self.model.format_prompts(captions).texts
        lengths = [len(ids) for ids in self.model.tokenizer(texts).input_ids]
        length = max(lengths)
        missing = [text for text in dict.fromkeys(texts) if (text, length) not in self.states]
        if missing:
            # Pad the missing ones to this batch's length by computing them beside a caption of that length.
            longest = texts[lengths.index(length)]
            with torch.no_grad():
                fused = self.model.fused_llm_states(missing + [longest])
            for text, row in zip(missing, fused):
                self.states[(text, length)] = row
        return torch.stack([self.states[(text, length)] for text in texts])


def pretrain_denoiser(model, settings: PretrainSettings, prompts: list[str],
                      losses: list[float] | None = None) -> float:
    """SFT-aux flow-matching steps (rl/flow_matching.py ``flow_matching_objective``, the loss the GRPO trainer
    adds with --sft_aux_coef) on the DiT and the connector path (projectors + connector), the LLM and meta
    queries frozen; returns the mean loss of the last 50 steps. ``losses``, when given, receives every step's loss
    (the steps' prompts and noise do not depend on ``settings.steps``, so a shorter run repeats a longer one's
    first steps).

    WHY these choices (a sweep with the earlier, noisier VAE; synthetic_match of 4-step CPS samples of the 8
    quick-start prompts, one seed each; untrained ~0.02): the random tiny connector adds a large
    prompt-independent part to its input, so its output differs between prompts by ~5% of its norm. A 2-layer
    32-wide DiT never learnt to use it (0.03 after 1500 steps); a 4-layer 128-wide one did, abruptly, between 1000
    (0.07) and 2000 steps (0.60 with the LLM training too, 0.76 with it frozen); every run under 1000 steps
    scored <= 0.13, and DiT lr 3e-3 stayed <= 0.05 even after 3000 steps. With the VAE deterministic and the LLM
    frozen, each prompt's latents and LLM states are computed once (``FrozenLLMStates``), and a step is the
    connector, the DiT and their backward."""
    from deepgen_rl.rl.flow_matching import flow_matching_objective

    rng = np.random.default_rng([settings.seed, 2])
    generator = torch.Generator().manual_seed(settings.seed + 1)
    model.set_trainable("dit_connector_llm")
    model.lmm.requires_grad_(False)
    model.meta_queries.requires_grad_(False)
    dit = [p for p in model.transformer.parameters() if p.requires_grad]
    conditioning = [p for name, p in model.named_parameters()
                    if p.requires_grad and not name.startswith("transformer.")]
    optimizer = torch.optim.AdamW([{"params": dit, "lr": settings.lr},
                                   {"params": conditioning, "lr": settings.conditioning_lr}], weight_decay=0.0)
    with torch.no_grad():
        latents = dict(zip(prompts, model.encode_images(rendered_batch(prompts, settings.image_size)).float()))
    llm_states = FrozenLLMStates(model)
    model.train()
    losses = [] if losses is None else losses
    progress = tqdm(range(settings.steps), desc="pretraining the tiny DiT", unit="step", mininterval=2.0)
    for step in progress:
        captions = _draw_prompts(rng, prompts, settings.batch_size)
        prompt_embeds, pooled = model.connect_fused_states(llm_states(captions))
        x0 = torch.stack([latents[caption] for caption in captions])
        loss = flow_matching_objective(model, x0, prompt_embeds, pooled, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit + conditioning, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == settings.steps - 1:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    model.requires_grad_(False)
    model.eval()
    return float(np.mean(losses[-50:])) if losses else float("nan")


@torch.no_grad()
def conditional_gap(model, prompts: list[str], settings: PretrainSettings) -> dict:
    """Flow-matching loss of every prompt's rendering with its own prompt and with another one (prompt i gets
    prompt i + n/2 + 1's: for the single-object prompts another colour AND another position), on one fixed draw
    of noise and t in [0.1, 0.9]: how much the model uses its prompt. Equal losses mean the DiT ignores the
    conditioning."""
    from deepgen_rl.rl import flow_matching_loss, noised_latents

    generator = torch.Generator().manual_seed(settings.seed + 3)
    x0 = model.encode_images(rendered_batch(prompts, settings.image_size), generator).float()
    noise = torch.randn(x0.shape, generator=generator)
    t = 0.1 + 0.8 * torch.rand((len(prompts),), generator=generator)
    x_t = noised_latents(x0, noise, t)
    embeds, pooled = model.encode_prompt(prompts)
    other = [(i + len(prompts) // 2 + 1) % len(prompts) for i in range(len(prompts))]
    own = flow_matching_loss(model.predict_velocity(x_t, t, embeds, pooled), x0, noise)
    shuffled = flow_matching_loss(model.predict_velocity(x_t, t, embeds[other], pooled[other]), x0, noise)
    return {"own_prompt": round(float(own), 4), "other_prompt": round(float(shuffled), 4)}


def pretrain_tiny_deepgen(model, settings: PretrainSettings) -> dict:
    """Both phases in place on ``model`` (a tiny DeepGen); returns a record of the settings and final losses."""
    torch.manual_seed(settings.seed)
    prompts = all_prompts(settings.max_objects)
    start = time.perf_counter()
    vae_losses: list[float] = []
    flow_losses: list[float] = []
    vae_loss = pretrain_vae(model.vae, settings, prompts, vae_losses)
    flow_loss = pretrain_denoiser(model, settings, prompts, flow_losses)
    gap = conditional_gap(model, prompts, settings)
    logger.info("flow-matching loss with each image's own prompt %.4f, with another prompt %.4f",
                gap["own_prompt"], gap["other_prompt"])
    return {"settings": asdict(settings), "vae_reconstruction_loss": vae_loss, "flow_matching_loss": flow_loss,
            "conditional_gap": gap, "seconds": round(time.perf_counter() - start, 1),
            "loss_curve": {"every": CURVE_EVERY, "vae": loss_curve(vae_losses),
                           "flow_matching": loss_curve(flow_losses)}}


def cached_record(output_dir: Path, settings: PretrainSettings, seed: int) -> dict | None:
    """The pretrain.json in ``output_dir`` if it was written with these settings and tiny-model seed."""
    path = Path(output_dir) / PRETRAIN_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    expected = {**asdict(settings)}
    if record.get("settings") != expected or record.get("model_seed") != seed:
        return None
    return record
