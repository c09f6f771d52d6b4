"""The rollout loop: log-probs recorded in rollout equal the recomputed ones (ratio exactly 1, fp32) for every
sampler, prompts encoded once, CFG, group noise, and ODE generation against a hand-written Euler loop."""

import math

import pytest
import torch
from torch import nn

from deepgen_rl.sampling.rollout import decode_images, generate_images, guided_velocity, recompute_step, rollout
from deepgen_rl.sampling.steps import effective_logprob_variant, gaussian_log_prob, step_coefficients, step_mean
from deepgen_rl.sampling.trajectory import Conditioning

SAMPLERS = [("cps_sde", "reference", 1.0), ("cps_sde", "exact", 0.8), ("flow_sde", "exact", 0.7),
            ("dance_sde", "exact", 1.0)]


class StandInModel(nn.Module):
    """Same methods as DeepGenModel, cheap and elementwise; counts encoder calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.encoded: list[list[str]] = []
        self.negative_calls = 0

    @property
    def device(self):
        return self.scale.device

    @property
    def dtype(self):
        return self.scale.dtype

    def encode_prompt(self, prompts):
        self.encoded.append(list(prompts))
        codes = torch.tensor([[len(p), sum(map(ord, p)) % 97, p.count("a")] for p in prompts], dtype=torch.float32)
        embeds = codes[:, :, None].expand(-1, -1, 4) / 50.0  # [B, 3, 4]
        return embeds, codes / 50.0

    def encode_prompt_and_negative(self, prompts):
        """The prompts' embeddings and one row of the negative's, from one call (as the real model's one batch)."""
        self.negative_calls += 1
        embeds, pooled = self.encode_prompt(prompts)
        return embeds, pooled, *self.negative(1)

    @staticmethod
    def negative(rows):
        return torch.full((rows, 3, 4), -0.2), torch.full((rows, 3), -0.1)

    def predict_velocity(self, latents, sigmas, prompt_embeds, pooled):
        cond = prompt_embeds.mean(dim=(1, 2)) + pooled.sum(dim=1)
        return torch.tanh(latents * self.scale) + cond[:, None, None, None] + sigmas[:, None, None, None]

    def sigma_schedule(self, num_inference_steps, height, width):
        t = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        return (3 * t / (1 + 2 * t)).to(torch.float32)

    def latent_shape(self, height, width):
        return 4, height // 8, width // 8

    def decode_latents(self, latents):
        return torch.sigmoid(latents[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)


def _rollout(model, sampler="cps_sde", variant="reference", eta=1.0, cfg=0.0, same=True, seed=0, micro=None,
             prompts=("a red apple", "two cats"), group=3, steps=4, size=64):
    return rollout(model, list(prompts), group_size=group, sampler=sampler, eta=eta, logprob_variant=variant,
                   num_inference_steps=steps, height=size, width=size, cfg_scale=cfg, init_same_noise=same,
                   generator=torch.Generator().manual_seed(seed), micro_batch_size=micro)


def _assert_recorded_equals_recomputed(model, traj, micro=None):
    rows_list = [slice(None)] if micro is None else [slice(i, i + micro) for i in range(0, traj.num_samples, micro)]
    with torch.no_grad():
        for step in range(traj.num_steps):
            for rows in rows_list:
                again = recompute_step(model, traj, step, rows)
                assert torch.equal(again.log_prob, traj.log_probs[rows, step]), (step, rows)


# ---------------------------------------------------------------- stand-in model: structure of the loop


def test_prompts_are_encoded_once_and_repeated_per_group():
    model = StandInModel()
    traj = _rollout(model, prompts=("a red apple", "two cats", "a dog"), group=2)
    assert model.encoded == [["a red apple", "two cats", "a dog"]] and model.negative_calls == 0
    assert traj.prompts == ["a red apple"] * 2 + ["two cats"] * 2 + ["a dog"] * 2
    embeds, pooled = model.encode_prompt(["a red apple", "two cats", "a dog"])
    assert torch.equal(traj.conditioning.prompt_embeds, embeds.repeat_interleave(2, 0))
    assert torch.equal(traj.conditioning.pooled, pooled.repeat_interleave(2, 0))
    assert traj.latents.shape == (6, 5, 4, 8, 8) and traj.log_probs.shape == (6, 4)
    assert torch.equal(traj.sigmas, model.sigma_schedule(4, 64, 64))
    assert not traj.latents.requires_grad and not traj.latents.is_inference()


def test_initial_noise_shared_within_a_group_only_when_asked():
    same = _rollout(StandInModel(), same=True)
    x0 = same.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[1], x0[2]) and not torch.equal(x0[2], x0[3])
    assert not torch.equal(same.latents[0, -1], same.latents[1, -1])  # the SDE noise still spreads the group
    independent = _rollout(StandInModel(), same=False).latents[:, 0]
    assert not torch.equal(independent[0], independent[1])


@pytest.mark.parametrize("sampler,variant,eta", SAMPLERS)
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_stand_in_recorded_log_probs_equal_recomputed(sampler, variant, eta, cfg):
    model = StandInModel()
    traj = _rollout(model, sampler=sampler, variant=variant, eta=eta, cfg=cfg, micro=4)
    _assert_recorded_equals_recomputed(model, traj, micro=4)
    assert torch.isfinite(traj.log_probs).all()


def test_cfg_combines_positive_and_negative_velocities():
    model = StandInModel()
    embeds, pooled = model.encode_prompt(["a", "bb"])
    neg, neg_pooled = model.negative(2)
    cond = Conditioning(embeds, pooled, neg, neg_pooled)
    x, sigma = torch.randn(2, 4, 2, 2), torch.tensor([0.7, 0.7])
    v_pos = model.predict_velocity(x, sigma, embeds, pooled)
    v_neg = model.predict_velocity(x, sigma, neg, neg_pooled)
    torch.testing.assert_close(guided_velocity(model, x, sigma, cond, 4.0), v_neg + 4.0 * (v_pos - v_neg))
    torch.testing.assert_close(guided_velocity(model, x, sigma, cond, 0.0), v_pos)
    with pytest.raises(ValueError, match="negative-prompt"):
        guided_velocity(model, x, sigma, Conditioning(embeds, pooled), 4.0)


def test_cfg_rollout_encodes_the_negative_prompt_once_beside_the_prompts():
    model = StandInModel()
    traj = _rollout(model, cfg=3.0)
    assert model.negative_calls == 1 and model.encoded == [["a red apple", "two cats"]]
    assert traj.conditioning.negative_prompt_embeds.shape == (6, 3, 4) and traj.settings.cfg_scale == 3.0


def test_generate_images_is_the_euler_ode_with_cfg():
    model = StandInModel()
    prompts = ["a red apple", "two cats"]
    images = generate_images(model, prompts, num_inference_steps=5, height=16, width=16, cfg_scale=4.0,
                             generator=torch.Generator().manual_seed(3), micro_batch_size=1)
    x = torch.randn((2, 4, 2, 2), generator=torch.Generator().manual_seed(3))
    embeds, pooled = model.encode_prompt(prompts)
    neg, neg_pooled = model.negative(2)
    sig = model.sigma_schedule(5, 16, 16).tolist()
    for i in range(5):
        s = torch.full((2,), sig[i])
        v_pos, v_neg = model.predict_velocity(x, s, embeds, pooled), model.predict_velocity(x, s, neg, neg_pooled)
        x = x + (sig[i + 1] - sig[i]) * (v_neg + 4.0 * (v_pos - v_neg))
    torch.testing.assert_close(images, model.decode_latents(x))


def test_bad_rollout_arguments_name_the_flag():
    with pytest.raises(ValueError, match="--atrain_sde_sampler"):
        _rollout(StandInModel(), sampler="ddpm")
    with pytest.raises(ValueError, match="--rollout_n"):
        _rollout(StandInModel(), group=0)
    with pytest.raises(ValueError, match="--rollout_cfg_scale"):
        _rollout(StandInModel(), cfg=-1.0)
    with pytest.raises(ValueError, match="--sde_eta"):
        _rollout(StandInModel(), eta=1.5)
    traj = _rollout(StandInModel(), sampler="ode")
    assert traj.log_probs is None
    with pytest.raises(ValueError, match="no log-probs"):
        recompute_step(StandInModel(), traj, 0)
    with pytest.raises(IndexError, match="outside"):
        traj.transition(4)


# ---------------------------------------------------------------- the real tiny DeepGen model


@pytest.fixture(scope="module")
def tiny_model():
    from deepgen_rl.model.tiny import build_tiny_deepgen

    return build_tiny_deepgen(seed=0)


@pytest.mark.parametrize("sampler,variant,eta", SAMPLERS)
def test_tiny_model_recorded_log_probs_equal_recomputed(tiny_model, sampler, variant, eta):
    traj = _rollout(tiny_model, sampler=sampler, variant=variant, eta=eta, steps=5)
    _assert_recorded_equals_recomputed(tiny_model, traj)
    # The same through the pure step functions and the model API directly (no rollout helpers).
    step = 2
    x, x_next = traj.latents[:, step].contiguous(), traj.latents[:, step + 1].contiguous()
    s, s_next = traj.sigmas[step].item(), traj.sigmas[step + 1].item()
    with torch.no_grad():
        v = tiny_model.predict_velocity(x, traj.sigmas[step].expand(6), traj.conditioning.prompt_embeds,
                                     traj.conditioning.pooled).float()
    coefs = step_coefficients(sampler, s, s_next, eta=eta, sigma_max=traj.sigmas[1].item())
    log_prob = gaussian_log_prob(x_next, step_mean(x, v, coefs), coefs.noise_std,
                                 effective_logprob_variant(sampler, variant))
    assert torch.equal(log_prob, traj.log_probs[:, step])
    ratio = torch.exp(log_prob - traj.log_probs[:, step])
    assert torch.equal(ratio, torch.ones(6))


def test_tiny_model_cfg_micro_batched_rollout_recomputes_exactly(tiny_model):
    traj = _rollout(tiny_model, sampler="cps_sde", variant="reference", cfg=3.0, micro=2, steps=3)
    _assert_recorded_equals_recomputed(tiny_model, traj, micro=2)


def test_tiny_model_rollout_outputs_and_training_gradient(tiny_model):
    traj = _rollout(tiny_model, sampler="cps_sde", variant="reference", eta=1.0, steps=4)
    images = decode_images(tiny_model, traj.latents[:, -1], 4)  # the trainer's decode phase, in micro-batches
    assert images.shape == (6, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    # The s_t the KL divides by (CPS, eta 1: s' sin(pi / 2)), as the training recompute reports it.
    sig = traj.sigmas.tolist()
    with torch.no_grad():
        stds = [recompute_step(tiny_model, traj, i).sampler_std for i in range(4)]
    assert stds == pytest.approx([sig[i + 1] * math.sin(math.pi / 2) for i in range(4)])
    again = _rollout(tiny_model, sampler="cps_sde", variant="reference", eta=1.0, steps=4)
    assert torch.equal(again.latents, traj.latents)  # same generator seed, same trajectory
    # Training recomputes with gradients on the recorded (non-inference) tensors.
    recomputed = recompute_step(tiny_model, traj, 1, slice(0, 3))
    assert recomputed.log_prob.requires_grad
    recomputed.log_prob.sum().backward()
    grads = [p.grad for p in tiny_model.transformer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny_model.zero_grad(set_to_none=True)


def test_tiny_model_ode_generation_is_deterministic(tiny_model):
    kwargs = dict(num_inference_steps=3, height=64, width=64, cfg_scale=4.0)
    first = generate_images(tiny_model, ["a red apple", "a blue car"], generator=torch.Generator().manual_seed(5),
                            **kwargs)
    second = generate_images(tiny_model, ["a red apple", "a blue car"], generator=torch.Generator().manual_seed(5),
                             **kwargs)
    assert first.shape == (2, 3, 64, 64) and torch.equal(first, second)


def test_tiny_model_dynamic_shift_follows_the_image_size(tiny_model):
    """use_dynamic_shifting (Flux/SD3 resolution-dependent shift): mu is linear in the latent token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); sigma = e^mu / (e^mu + 1/t - 1) over
    t = linspace(1, 1/1000, T), then 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    original = tiny_model.scheduler
    tiny_model.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        original.config, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5,
        max_shift=1.5)
    try:
        sigmas = tiny_model.sigma_schedule(4, 64, 64)
    finally:
        tiny_model.scheduler = original
    _, h, w = tiny_model.latent_shape(64, 64)
    patch = tiny_model.transformer.config.patch_size
    mu = 0.5 + (1.5 - 0.5) / (64 - 4) * ((h // patch) * (w // patch) - 4)
    t = torch.linspace(1.0, 1.0 / 1000, 4, dtype=torch.float64)
    expected = torch.cat([math.exp(mu) / (math.exp(mu) + 1 / t - 1), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk, cfg", [(1, 3.0), (4, 0.0)])
def test_bf16_training_chunks_recompute_the_recorded_log_probs_whatever_their_size(tiny_model, chunk, cfg):
    """In bf16 a DiT forward's result depends on how many rows it runs, so a log-prob recorded in a forward of the
    rollout micro-batch (6 rows here) and recomputed in a training chunk of another size moved the first chunk's
    ratio off 1 by 3e-5 (no CFG) to 2e-4 (CFG 4) on the tiny model, i.e. 30-230% of --clip_range 1e-4 (docs/memory.md).
    Recorded with the chunk's forward size (``forward_rows``, the trainer's BatchPlan.forward_rows), every chunk
    of the training chunking recomputes its recorded log-probs to fp32 rounding: the same fp32 formula on the same
    bf16 velocity, so at most a few ulps of |log_prob| (bound: 16 ulps, eps_fp32 = 2^-23)."""
    from copy import deepcopy

    model = deepcopy(tiny_model).to(torch.bfloat16)
    traj = rollout(model, ["a red apple", "two cats"], group_size=3, sampler="cps_sde", eta=1.0,
                   logprob_variant="reference", num_inference_steps=4, height=64, width=64, cfg_scale=cfg,
                   init_same_noise=False, generator=torch.Generator().manual_seed(0), micro_batch_size=6,
                   forward_rows=min(chunk, 6))
    assert traj.settings.forward_rows == min(chunk, 6)
    with torch.no_grad():
        for step in range(traj.num_steps - 1):
            for start in range(0, 6, chunk):
                rows = slice(start, start + chunk)
                old = traj.log_probs[rows, step]
                bound = 16 * 2.0 ** -23 * float(old.abs().max().clamp(min=1.0))
                deviation = (recompute_step(model, traj, step, rows).log_prob - old).abs().max()
                assert float(deviation) <= bound, (step, rows, float(deviation), bound)
