"""The GRPO chunk objective and the reference policy on the tiny model (no DeepSpeed), checked against closed forms."""

from __future__ import annotations

import torch

from deepgen_rl.model.tiny import build_tiny_deepgen
from deepgen_rl.sampling import rollout
from deepgen_rl.trainer.objective import ObjectiveSettings, policy_chunk_objective
from deepgen_rl.trainer.reference_policy import ReferencePolicy
from deepgen_rl.trainer.trainable import LoraSettings, configure_trainable


def _trajectory(model, cfg_scale=0.0):
    return rollout(model, ["a red apple", "a blue sky"], group_size=3, sampler="cps_sde", eta=1.0,
                   logprob_variant="reference", num_inference_steps=5, height=64, width=64, cfg_scale=cfg_scale,
                   init_same_noise=True, generator=torch.Generator().manual_seed(0))


def _settings(kl_type="v-based", beta=0.1):
    return ObjectiveSettings(clip_range=1e-4, advantage_clip=5.0, beta=beta, kl_type=kl_type)


def test_unchanged_policy_ratio_one_zero_kl_and_loss_is_minus_mean_advantage():
    model = build_tiny_deepgen(seed=0)
    configure_trainable(model, "dit", None)
    reference = ReferencePolicy.frozen_copy(model, ["transformer"])
    trajectory = _trajectory(model, cfg_scale=2.0)
    advantages = torch.tensor([1.0, -2.0, 0.5, 0.25, 3.0, -1.0])
    valid = torch.tensor([True, True, False, True, True, True])
    out = policy_chunk_objective(model, trajectory, 2, slice(None), advantages=advantages, valid=valid,
                                 settings=_settings(), reference=reference, reference_conditioning=None)
    assert out.ratio_max_dev == 0.0 and out.kl == 0.0 and out.num_valid == 5
    # ratio 1 and KL 0: L = mean over valid samples of -A = -(1 - 2 + 0.25 + 3 - 1) / 5.
    assert torch.isclose(out.loss, torch.tensor(-1.25 / 5))
    out.loss.backward()
    assert all(p.grad is not None for p in model.transformer.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.lmm.parameters())


def test_x_based_kl_is_v_based_scaled_by_the_step_coefficient():
    # CPS with eta 1: mean = (1 - s') x0_hat = (1 - s')(x - s v), so mean - mean_ref = -s (1 - s') (v - v_ref)
    # and the x-based KL is (s (1 - s'))^2 times the v-based one (same 2 s_t^2 + 1e-7 denominator).
    model = build_tiny_deepgen(seed=0)
    configure_trainable(model, "dit", None)
    reference = ReferencePolicy.frozen_copy(model, ["transformer"])
    trajectory = _trajectory(model)
    with torch.no_grad():
        for param in model.transformer.parameters():
            param.add_(0.01 * torch.randn_like(param))
    advantages, valid, step = torch.zeros(6), torch.ones(6, dtype=torch.bool), 1
    kls = {kind: policy_chunk_objective(model, trajectory, step, slice(None), advantages=advantages, valid=valid,
                                        settings=_settings(kind), reference=reference,
                                        reference_conditioning=None).kl for kind in ("v-based", "x-based")}
    s, s_next = (float(v) for v in trajectory.sigmas[step:step + 2])
    assert kls["v-based"] > 0
    assert abs(kls["x-based"] / kls["v-based"] - (s * (1 - s_next)) ** 2) < 1e-4


def test_frozen_copy_shares_frozen_parts_and_stays_put():
    model = build_tiny_deepgen(seed=0)
    names = configure_trainable(model, "dit_connector", None)
    reference = ReferencePolicy.frozen_copy(model, names)
    copy = reference._model
    assert copy.lmm is model.lmm and copy.vae is model.vae  # shared, not duplicated
    assert copy.transformer is not model.transformer and copy.meta_queries is not model.meta_queries
    assert not any(p.requires_grad for p in copy.transformer.parameters())
    with torch.no_grad():
        model.meta_queries.add_(1.0)
    assert not torch.equal(copy.meta_queries, model.meta_queries)


def test_lora_trains_adapters_only_and_reference_is_the_base_model():
    model = build_tiny_deepgen(seed=0)
    configure_trainable(model, "dit", LoraSettings(rank=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    reference = ReferencePolicy.adapters_disabled(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # adapters now change the output
    trajectory = _trajectory(model)
    x, _ = trajectory.transition(1)
    sigmas = trajectory.sigmas[1].expand(x.shape[0])
    cond = trajectory.conditioning
    base = build_tiny_deepgen(seed=0)
    with torch.no_grad():
        v_policy = model.predict_velocity(x, sigmas, cond.prompt_embeds, cond.pooled)
        v_base = base.predict_velocity(x, sigmas, cond.prompt_embeds, cond.pooled)
    v_ref = reference.velocity(x, sigmas, cond, 0.0)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_policy, v_base)
    with torch.no_grad():  # adapters are back on after the reference call
        assert torch.equal(model.predict_velocity(x, sigmas, cond.prompt_embeds, cond.pooled), v_policy)
