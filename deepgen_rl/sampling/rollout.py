"""The rollout loop (SDE sampling with recorded log-probs), its recompute twin, and ODE generation for evaluation.

``rollout`` takes the B UNIQUE prompts of this rank and the group size G; it encodes them once, repeats the
embeddings G times (the G copies of a prompt adjacent: N = B * G rows) and samples on the chosen sampler.
Everything runs under ``torch.no_grad()`` (not ``inference_mode``: the recorded latents feed the training
forward, and inference tensors cannot be saved for backward).

The loop is lean on purpose (benchmarks/bench_rollout.py holds it to <= 5% over a bare Euler loop): step
coefficients are python floats computed once, sigmas are looked up by index, there is no host sync per step
and the only per-step allocations are the model output, the noise and the step's results.

Shape legend: B prompts, G group size, N = B * G, T steps, C/h/w latent, H/W image.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from deepgen_rl.core.sde_checks import check_sde_eta, check_sde_steps
from deepgen_rl.sampling.edit_conditioning import EditConditioning
from deepgen_rl.sampling.mixed_conditioning import MixedConditioning, encode_edit_aware, encode_kind
from deepgen_rl.sampling.noise import NoiseSource, SampleNoise
from deepgen_rl.sampling.steps import (
    LOGPROB_VARIANTS,
    SAMPLERS,
    LogProbVariant,
    Sampler,
    effective_logprob_variant,
    gaussian_log_prob,
    sample_with_coefficients,
    step_coefficients,
    step_mean,
)
from deepgen_rl.sampling.trajectory import (
    Conditioning,
    Rows,
    SamplerSettings,
    Trajectory,
    repeat_groups,
    split_rows,
)


def guided_velocity(model, latents: Tensor, sigma: Tensor, cond: Conditioning, cfg_scale: float,
                    model_dtype: Optional[torch.dtype] = None, forward_rows: Optional[int] = None) -> Tensor:
    """Model velocity with optional classifier-free guidance, in fp32.

    latents: [n, C, h, w] (fp32; cast to the model dtype for the forward); sigma: [n]; cond: n rows.
    cfg_scale > 0: v = v_neg + cfg * (v_pos - v_neg), positives and negatives in one batched DiT forward (the
    negative was encoded in the positives' batch, so it has their length; edit rows' negatives get the same
    reference latents, as DeepGen's pipeline doubles its ``cond_latents``). Rollout and training both call this,
    so their velocities match exactly. A MixedConditioning runs one pass per prompt kind.
    ``forward_rows``: at most this many rows per forward (SamplerSettings.forward_rows; None: all n at once).
    """
    if forward_rows is not None and latents.shape[0] > forward_rows:
        return torch.cat([guided_velocity(model, latents[rows], sigma[rows], cond.select(rows), cfg_scale, model_dtype)
                          for rows in split_rows(latents.shape[0], forward_rows)])
    if isinstance(cond, MixedConditioning):
        return cond.combine(lambda rows, part: guided_velocity(model, latents[rows], sigma[rows], part, cfg_scale,
                                                               model_dtype), latents)
    dtype = model.dtype if model_dtype is None else model_dtype
    x = latents.to(dtype)
    refs = cond.references
    if cfg_scale <= 0:
        return model.predict_velocity(x, sigma, cond.prompt_embeds, cond.pooled, **_dit_refs(refs)).float()
    neg, neg_pooled = cond.negative_prompt_embeds, cond.negative_pooled
    if neg is None or neg_pooled is None:
        raise ValueError("cfg_scale > 0 needs negative-prompt embeddings in the conditioning "
                         "(encode_conditioning with cfg_scale > 0 adds them).")
    v = model.predict_velocity(
        torch.cat([x, x]), torch.cat([sigma, sigma]),
        torch.cat([cond.prompt_embeds, neg]), torch.cat([cond.pooled, neg_pooled]),
        **_dit_refs(None if refs is None else refs + refs),
    ).float()
    v_pos, v_neg = v.chunk(2)
    return v_neg + cfg_scale * (v_pos - v_neg)


def _dit_refs(references: Optional[list]) -> dict:
    # Passed only for edit rows: a text-to-image call stays exactly the SD3 forward it always was.
    return {} if references is None else {"reference_latents": references}


def encode_conditioning(model, prompts: Sequence[str], group_size: int, cfg_scale: float,
                        edit: Optional[EditConditioning] = None) -> Conditioning:
    """Encode the B unique prompts once (one LLM forward) and repeat each G times -> N rows.

    With cfg_scale > 0 the negative ``chat_text("")`` rides in that same left-padded forward and is expanded (a
    view) to N rows. ``edit`` (N rows): edit prompts go through the vision tower in their own forward, each with
    its own negative (sampling/mixed_conditioning.py).
    """
    if edit is not None and edit.edit_rows:
        return encode_edit_aware(model, prompts, group_size, cfg_scale, edit)
    return encode_kind(model, prompts, None, group_size, cfg_scale)


def initial_noise(num_prompts: int, group_size: int, latent_shape: tuple[int, int, int], *, same_in_group: bool,
                  generator: NoiseSource, device: torch.device) -> Tensor:
    """x_0 ~ N(0, I): [N, C, h, w] fp32; with ``same_in_group`` one draw per prompt shared by its G samples.
    A ``SampleNoise`` (N streams): every row draws its first number block from its own stream (so the later SDE
    draws of a row do not depend on the flag), and with ``same_in_group`` a group shares its first row's draw."""
    if isinstance(generator, SampleNoise):
        if len(generator) != num_prompts * group_size:
            raise ValueError(f"SampleNoise has {len(generator)} streams for {num_prompts * group_size} samples.")
        noise = generator.randn(latent_shape).to(device)
        return repeat_groups(noise[::group_size], group_size) if same_in_group else noise
    rows = num_prompts if same_in_group else num_prompts * group_size
    noise = torch.randn((rows, *latent_shape), generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(device)
    return repeat_groups(noise, group_size) if same_in_group else noise


def denoise_loop(model, x: Tensor, cond: Conditioning, sigmas: Tensor, settings: SamplerSettings,
                 generator: Optional[NoiseSource], latents_out: Optional[Tensor] = None,
                 log_probs_out: Optional[Tensor] = None, window: Optional[tuple[int, int]] = None,
                 means_out: Optional[Tensor] = None) -> Tensor:
    """Run all T steps on one micro-batch of n samples and return x_T [n, C, h, w] fp32.

    x: [n, C, h, w] fp32 initial noise; cond: n rows; sigmas: [T + 1] fp32 (CPU). ``window`` (start, end): the
    steps start..end-1 run the SDE sampler (log-probs recorded), the others the ODE (MixGRPO / Flow-GRPO-Fast);
    None = (0, T). When given, x_start..x_end are written into the STEP-MAJOR ``latents_out`` [end - start + 1,
    n, C, h, w] (each slot contiguous, so the sampler writes x' in place: no copy per step) and the window's
    log-probs into ``log_probs_out`` [T, n] at their step rows; ``means_out`` [end - start, n, C, h, w] receives each
    window step's Gaussian mean (GRPO-Guard's mean_old). ``generator``: a shared generator, or the n rows' own
    streams (``SampleNoise``, sampling/noise.py: a row's noise then does not depend on the micro-batch).
    """
    sigma_list = sigmas.tolist()  # one host read for the whole loop; the step math uses these floats
    num_steps = len(sigma_list) - 1
    start, end = (0, num_steps) if window is None else window
    n = x.shape[0]
    # Row i is sigma_i repeated n times: views made once, indexed by step (never looked up by float timestep).
    sigma_rows = sigmas.to(x.device).unsqueeze(1).expand(num_steps + 1, n).unbind(0)
    sde = settings.sampler != "ode"
    coefs = [step_coefficients(settings.sampler if sde and start <= i < end else "ode", sigma_list[i],
                               sigma_list[i + 1], eta=settings.eta, sigma_max=sigma_list[1]) for i in range(num_steps)]
    variant = effective_logprob_variant(settings.sampler, settings.logprob_variant)
    dtype = model.dtype
    if latents_out is not None and start == 0:
        x = latents_out[0].copy_(x)
    for i in range(num_steps):
        v = guided_velocity(model, x, sigma_rows[i], cond, settings.cfg_scale, dtype, settings.forward_rows)
        slot = None if latents_out is None or not start <= i + 1 <= end else latents_out[i + 1 - start]
        if not (sde and start <= i < end):
            x = step_mean(x, v, coefs[i])
            if slot is not None:
                x = slot.copy_(x)
        else:
            own = generator.randn(x.shape[1:]) if isinstance(generator, SampleNoise) else None
            result = sample_with_coefficients(x, v, coefs[i], variant, None if own is not None else generator, own,
                                              out=slot)
            x = result.next_latents
            if log_probs_out is not None:
                log_probs_out[i] = result.log_prob
            if means_out is not None:
                means_out[i - start].copy_(result.mean)
    return x


def _validate(sampler: str, logprob_variant: str, eta: float, num_inference_steps: int, group_size: int,
              cfg_scale: float, num_prompts: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler (--atrain_sde_sampler) must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")
    if logprob_variant not in LOGPROB_VARIANTS:
        raise ValueError(f"--logprob_variant must be one of {', '.join(LOGPROB_VARIANTS)}; got {logprob_variant!r}.")
    if sampler != "ode":
        check_sde_eta(eta)
        check_sde_steps(num_inference_steps)
    elif num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1 for generation; got {num_inference_steps}.")
    if group_size < 1:
        raise ValueError(f"group_size (--rollout_n) must be >= 1; got {group_size}.")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale (--rollout_cfg_scale) must be >= 0 (0 disables CFG); got {cfg_scale}.")
    if num_prompts < 1:
        raise ValueError("rollout needs at least one prompt.")


def decode_images(model, latents: Tensor, micro_batch_size: Optional[int]) -> Tensor:
    """VAE-decode [N, C, h, w] latents in micro-batches -> images [N, 3, H, W] fp32 in [0, 1].

    The VAE decoder's activations at full resolution are the step's largest transient (~0.3 GiB per 512^2 image
    in bf16), so decode runs in its own micro-batch (--vae_decode_micro_batch_size), smaller than the DiT's.
    A row whose latent or decoded pixels hold NaN/inf comes back all NaN (the clamp would turn inf into white and
    the reward step would score it); the reward step fails such a sample instead.
    """
    dtype = model.dtype
    chunks = [model.decode_latents(latents[rows].to(dtype)).float()
              for rows in split_rows(len(latents), micro_batch_size)]
    images = torch.cat(chunks)
    diverged = ~(torch.isfinite(latents).flatten(1).all(dim=1).to(images.device)
                 & torch.isfinite(images).flatten(1).all(dim=1))
    images.clamp_(0.0, 1.0)
    images[diverged] = math.nan
    return images


def rollout(model, prompts: Sequence[str], *, group_size: int, sampler: Sampler, eta: float,
            logprob_variant: LogProbVariant, num_inference_steps: int, height: int, width: int, cfg_scale: float,
            init_same_noise: bool, generator: NoiseSource, micro_batch_size: Optional[int] = None,
            sde_window: Optional[tuple[int, int]] = None,
            on_micro_batch: Optional[Callable[[slice, Tensor], None]] = None,
            record_means: bool = False, edit: Optional[EditConditioning] = None,
            forward_rows: Optional[int] = None) -> Trajectory:
    """Sample G images for each of the B unique ``prompts`` and record the trajectory.

    Returns a :class:`Trajectory` with N = B * G rows (prompt b's samples at rows b*G .. b*G + G - 1).
    ``micro_batch_size`` bounds the rows per model forward (None: all at once). ``generator`` drives the
    initial and per-step noise (put it on the model's device to avoid host-to-device copies per step); a
    ``SampleNoise`` of N streams gives each sample its own (the trainer keys them by global sample index, so
    neither the micro-batch size nor the number of ranks changes a sample's noise).
    ``sde_window`` (start, end): SDE only on steps start..end-1, ODE elsewhere, and only x_start..x_end kept
    (None: every step SDE, all T + 1 latents kept). ``on_micro_batch(rows, x_T)`` is called after each
    micro-batch with its rows and final latents [n, C, h, w] (the trainer streams them to the rewards).
    ``record_means``: also keep every step's Gaussian mean (``Trajectory.means``; GRPO-Guard needs mean_old).
    ``edit``: the N rows' source conditioning (``build_edit_conditioning``) when a prompt is an edit.
    ``forward_rows``: rows per DiT forward inside a micro-batch (None: the whole micro-batch); the trainer passes
    its training chunk's forward size, which ``recompute_step`` reuses (``SamplerSettings.forward_rows``).
    Images are not decoded here: the trainer decodes x_T in its own phase (:func:`decode_images`).
    """
    _validate(sampler, logprob_variant, eta, num_inference_steps, group_size, cfg_scale, len(prompts))
    start, end = (0, num_inference_steps) if sde_window is None else sde_window
    if not 0 <= start < end <= num_inference_steps:
        raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start < end <= {num_inference_steps} steps.")
    if forward_rows is not None and forward_rows < 1:
        raise ValueError(f"forward_rows must be a positive integer or None; got {forward_rows}.")
    settings = SamplerSettings(sampler=sampler, eta=float(eta), logprob_variant=logprob_variant,
                               cfg_scale=float(cfg_scale), forward_rows=forward_rows)
    device = model.device
    with torch.no_grad():
        cond = encode_conditioning(model, prompts, group_size, cfg_scale, edit)
        sigmas = model.sigma_schedule(num_inference_steps, height, width).detach().to("cpu", torch.float32)
        latent_shape = tuple(model.latent_shape(height, width))
        x0 = initial_noise(len(prompts), group_size, latent_shape, same_in_group=init_same_noise,
                           generator=generator, device=device)
        num = x0.shape[0]
        # Step-major storage (see denoise_loop) of the window's W + 1 latents; the Trajectory sees [N, W + 1, ...]
        # / [N, T] views of it. x_T is kept apart only when the window ends before T (released once decoded).
        latents = torch.empty((end - start + 1, num, *latent_shape), dtype=torch.float32, device=device)
        final = None if end == num_inference_steps else torch.empty((num, *latent_shape), dtype=torch.float32,
                                                                     device=device)
        log_probs = None if sampler == "ode" else torch.full((num_inference_steps, num), float("nan"),
                                                             dtype=torch.float32, device=device)
        means = (torch.empty((end - start, num, *latent_shape), dtype=torch.float32, device=device)
                 if record_means and sampler != "ode" else None)
        for rows in split_rows(num, micro_batch_size):
            noise = generator.select(rows) if isinstance(generator, SampleNoise) else generator
            x_final = denoise_loop(model, x0[rows], cond.select(rows), sigmas, settings, noise, latents[:, rows],
                                   None if log_probs is None else log_probs[:, rows], (start, end),
                                   None if means is None else means[:, rows])
            if final is not None:
                final[rows] = x_final
            if on_micro_batch is not None:
                on_micro_batch(rows, x_final)
    return Trajectory(
        prompts=[p for p in prompts for _ in range(group_size)], group_size=group_size, conditioning=cond,
        latents=latents.transpose(0, 1), log_probs=None if log_probs is None else log_probs.transpose(0, 1),
        sigmas=sigmas, settings=settings, step_offset=start, final=final,
        means=None if means is None else means.transpose(0, 1), edit=edit,
    )


@dataclass(frozen=True)
class RecomputedStep:
    """One step re-evaluated under the current model (grad mode is the caller's).

    log_prob: [n] of the recorded transition; velocity: [n, C, h, w] fp32 (for the v-based KL);
    mean: [n, C, h, w] fp32 Gaussian mean (for the x-based KL); sampler_std: s_t of the step (float).
    """

    log_prob: Tensor
    velocity: Tensor
    mean: Tensor
    sampler_std: float


def recompute_step(model, trajectory: Trajectory, step: int, rows: Rows = slice(None)) -> RecomputedStep:
    """Re-run the model on the recorded x_step of ``rows`` and score the recorded transition (same arithmetic as
    the rollout, and forwards of the rollout's ``forward_rows``, so with unchanged weights the log-prob equals the
    recorded one)."""
    settings = trajectory.settings
    if settings.sampler == "ode":
        raise ValueError("an ODE trajectory has no log-probs to recompute; roll out with cps_sde, flow_sde or "
                         "dance_sde.")
    x, x_next = trajectory.transition(step, rows)
    sigma, sigma_next = trajectory.sigma_pair(step)
    sigma_vec = trajectory.sigmas[step].to(x.device).expand(x.shape[0])
    v = guided_velocity(model, x, sigma_vec, trajectory.conditioning.select(rows), settings.cfg_scale,
                        forward_rows=settings.forward_rows)
    coefs = step_coefficients(settings.sampler, sigma, sigma_next, eta=settings.eta,
                              sigma_max=trajectory.sigma_max)
    mean = step_mean(x, v, coefs)
    variant = effective_logprob_variant(settings.sampler, settings.logprob_variant)
    log_prob = gaussian_log_prob(x_next, mean, coefs.noise_std, variant)
    return RecomputedStep(log_prob=log_prob, velocity=v, mean=mean, sampler_std=float(coefs.sampler_std))


def generate_images(model, prompts: Sequence[str], *, num_inference_steps: int, height: int, width: int,
                    cfg_scale: float, generator: torch.Generator, micro_batch_size: Optional[int] = None,
                    decode_micro_batch_size: Optional[int] = None, edit: Optional[EditConditioning] = None) -> Tensor:
    """Deterministic ODE (Euler) generation for evaluation: one image per prompt -> [len(prompts), 3, H, W] in [0, 1].

    ``decode_micro_batch_size`` bounds the rows per VAE decode (None: ``micro_batch_size``); ``edit`` (one row per
    prompt): the source conditioning of edit prompts (edit evaluation).

    The reference evaluates with cfg_scale 4.0 and 50 steps (eval.yaml carries both per dataset).
    """
    _validate("ode", "reference", 0.0, num_inference_steps, 1, cfg_scale, len(prompts))
    settings = SamplerSettings(sampler="ode", eta=0.0, logprob_variant="reference", cfg_scale=float(cfg_scale))
    with torch.no_grad():
        cond = encode_conditioning(model, prompts, 1, cfg_scale, edit)
        sigmas = model.sigma_schedule(num_inference_steps, height, width).detach().to("cpu", torch.float32)
        latent_shape = tuple(model.latent_shape(height, width))
        x0 = initial_noise(len(prompts), 1, latent_shape, same_in_group=False, generator=generator,
                           device=model.device)
        finals = [denoise_loop(model, x0[rows], cond.select(rows), sigmas, settings, None, None, None)
                  for rows in split_rows(len(prompts), micro_batch_size)]
        decode_rows = micro_batch_size if decode_micro_batch_size is None else decode_micro_batch_size
        return decode_images(model, torch.cat(finals), decode_rows)
