"""Exponential moving average (EMA) of the trained parameters: --ema_decay, --ema_update_every, --ema_device.

The reference's EMA (docs/algorithms.md#what-the-reference-trainer-does) never updates (its hook is never called), is
kept in bf16
(which swallows small updates) and is never saved. This one:

* is updated right after every APPLIED optimizer step of the trained modules (:meth:`EMA.step`). With s the number
  of optimizer steps taken before this one (0 at the first), an update happens when s % k == 0
  (k = --ema_update_every), with the warm-up of flow_grpo's ``ema.py`` (the reference's formula):

      d_eff(s) = min((1 + s) / (10 + s), d),        e <- d_eff * e + (1 - d_eff) * p

* keeps fp32 copies either sharded beside each rank's fp32 master partition (``--ema_device gpu``, the default:
  trainer/ema_shards.py, ``ShardedEMA``; averaged from the fp32 master weights, 4 bytes per trained parameter /
  world size, one fused foreach lerp per update) or as a whole host copy on every rank (``cpu``: this module's
  ``EMA``, averaged from the 16-bit weights, 4 bytes per trained parameter of host memory on every rank);
* is saved in every checkpoint as ``ema.pt`` (whole tensors by state-dict name, numbers: loadable weights-only;
  the same file from either device and any world size, so a resume may change both) and restored exactly on
  resume; ``scripts/utils/rlckpt_to_sftckpt.py --weights ema`` exports it;
* is swapped into the model for evaluation and sample grids (``applied_to``), then the live weights are
  restored bit for bit.

Why not diffusers' ``EMAModel``: its update subtracts the shadow from the parameter on one device, so a CPU shadow
would need a full host copy of the weights per update (here one parameter at a time), and its warm-up counts its own
calls, not optimizer steps (they differ when k > 1). The host copy needs whole parameters (ZeRO-1/2); under ZeRO-3
only the sharded one works (config/__init__.py refuses ``--ema_device cpu`` there).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from deepgen_rl.sampling import decode_images, rollout

import deepgen_rl.trainer.checkpointing as checkpointing

logger = logging.getLogger(__name__)


def warmup_decay(step: int, decay: float) -> float:
    """d_eff(s) = min((1 + s) / (10 + s), d): 0.1 at s = 0, 0.55 at 10, 0.91 at 90 (then capped at d)."""
    return min((1.0 + step) / (10.0 + step), decay)


class EmaCounters:
    """The warm-up counters of an EMA and their checkpoint numbers, shared by the host copy (``EMA``) and the sharded
    one (trainer/ema_shards.py ``ShardedEMA``)."""

    def __init__(self, *, decay: float, update_every: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1) for an EMA (0 turns it off); got {decay}.")
        if update_every < 1:
            raise ValueError(f"--ema_update_every must be a positive integer; got {update_every}.")
        self.decay, self.update_every = float(decay), int(update_every)
        self.optimizer_steps = 0  # s: optimizer steps seen so far
        self.num_updates = 0
        self.last_decay = float("nan")

    def _advance(self) -> Optional[float]:
        """Count one applied optimizer step; d_eff when this step updates the average, else None."""
        s = self.optimizer_steps
        self.optimizer_steps += 1
        if s % self.update_every:
            return None
        d = warmup_decay(s, self.decay)
        self.num_updates += 1
        self.last_decay = d
        return d

    def metrics(self) -> dict[str, float]:
        return {"ema/decay": self.last_decay, "ema/updates": float(self.num_updates)}

    def _counters_state(self) -> dict:
        return {"decay": self.decay, "update_every": self.update_every, "optimizer_steps": self.optimizer_steps,
                "num_updates": self.num_updates, "last_decay": self.last_decay}

    def _load_counters(self, state: dict, source: str) -> None:
        if state.get("decay") != self.decay or state.get("update_every") != self.update_every:
            logger.warning("%s was saved with --ema_decay %s --ema_update_every %s; continuing with %s and %s.",
                           source, state.get("decay"), state.get("update_every"), self.decay, self.update_every)
        self.optimizer_steps = int(state["optimizer_steps"])
        self.num_updates = int(state["num_updates"])
        self.last_decay = float(state.get("last_decay", float("nan")))

    def load_checkpoint(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        """Resume the EMA of ``checkpoint_dir`` (its ema.pt, whole tensors from any world size); a checkpoint saved
        without one restarts the average at the resumed weights, with a warning."""
        saved = checkpointing.read_ema_state(checkpoint_dir)
        if saved is None:
            self.reset(model)
            logger.warning("%s holds no EMA (saved with --ema_decay 0): the EMA starts at the resumed weights.",
                           checkpoint_dir)
            return
        self.load_state_dict(saved, str(Path(checkpoint_dir) / checkpointing.EMA_STATE_NAME))


def saved_shadow(state, source: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The ``shadow`` of a saved EMA state ({name: whole tensor}), checked against the names and shapes this run
    averages."""
    shadow = state.get("shadow") if isinstance(state, dict) else None
    if not isinstance(shadow, dict):
        raise ValueError(f"{source} holds no EMA ('shadow' missing): not written by this trainer.")
    missing, unexpected = sorted(set(expected) - set(shadow)), sorted(set(shadow) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} averages other parameters than this run trains (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}): same --trainable_modules / --use_lora as the saved run?")
    for name, tensor in shadow.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(f"{source}: EMA of {name} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(expected[name])}.")
    return shadow


class EMA(EmaCounters):
    """``--ema_device cpu``: fp32 host copies ``shadow[name]`` of the model's trainable parameters (state-dict names,
    e.g. ``transformer.proj_out.weight``) on every rank, averaged from the 16-bit weights."""

    def __init__(self, model: torch.nn.Module, *, decay: float, update_every: int = 1):
        super().__init__(decay=decay, update_every=update_every)
        self.device = "cpu"
        self.collective = False  # applied_to / full_shadow are this rank's own business
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset(model)

    def _trained(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start the average at the model's current weights (counters kept)."""
        self.shadow = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in self._trained(model)}
        if not self.shadow:
            raise ValueError("--ema_decay > 0 but the model has no trainable parameters to average.")

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> bool:
        """Call right after each applied optimizer step; returns whether this step updated the average."""
        d = self._advance()
        if d is None:
            return False
        for name, param in self._trained(model):
            shadow = self.shadow[name]
            # lerp_: e + (1 - d) (p - e) = d e + (1 - d) p, one parameter at a time (no full host copy).
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1.0 - d)
        return True

    def full_shadow(self, dst: Optional[int] = None) -> dict[str, torch.Tensor]:
        """{state-dict name: fp32 EMA}: this rank's own whole copy (no collective; ``dst`` is ignored)."""
        return self.shadow

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside, the model's trained parameters hold the EMA (cast to their dtype); afterwards the live weights are
        restored exactly (from a CPU backup), even when the body raises."""
        params = dict(model.named_parameters())
        backup: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, shadow in self.shadow.items():
                    param = params[name]
                    backup[name] = param.detach().to("cpu", copy=True)
                    param.copy_(shadow.to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    params[name].copy_(saved.to(params[name].device))

    def state_dict(self) -> dict:
        """Tensors (on the CPU) and numbers only, so ``torch.load(weights_only=True)`` reads it."""
        return {"shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}, **self._counters_state()}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Restore a saved EMA exactly; ``source`` (the file) is named in every error."""
        shadow = saved_shadow(state, source, {name: tuple(t.shape) for name, t in self.shadow.items()})
        for name, tensor in shadow.items():
            self.shadow[name] = tensor.to(self.shadow[name].device, torch.float32, copy=True)
        self._load_counters(state, source)


def ema_sample_images(ema, model: torch.nn.Module, prompts: Sequence[str], args,
                      generator: torch.Generator, edit=None) -> torch.Tensor:
    """The sample grid under --ema_decay: the EMA weights' images [N, 3, H, W] of the step's B ``prompts`` x G, drawn
    with the rollout's sampler flags and (given the rollout's seed) its noise, so the grid shows the weights that
    evaluation and the converter's ``--weights ema`` use, on the same draws as the policy's rollout."""
    with ema.applied_to(model):
        model.eval()
        trajectory = rollout(
            model, list(prompts), group_size=args.rollout_n, eta=args.sde_eta,
            sampler="ode" if args.atrain_algorithm == "diffusionnft" else args.atrain_sde_sampler,
            logprob_variant=args.logprob_variant, num_inference_steps=args.num_inference_steps,
            height=args.image_height, width=args.image_width, cfg_scale=args.rollout_cfg_scale,
            init_same_noise=args.init_same_noise, generator=generator,
            micro_batch_size=args.rollout_micro_batch_size, edit=edit)
        return decode_images(model, trajectory.latents[:, -1], args.vae_decode_micro_batch_size)
