"""The DeepGen joint model: Qwen2.5-VL -> meta queries -> multi-layer fusion -> connector -> SD3 DiT.

Conditioning path (docs/upstream_compatibility.md#conditioning-path), for B prompts:

    chat-formatted prompt tokens [B, P] ++ meta queries [B, Q]        (queries replace zero token ids)
    -> Qwen2.5-VL decoder, hidden states of layers L-1, L-7, ... concatenated   [B, P+Q, n*H_llm]
    -> projector_1 -> connector                                              [B, P+Q, D_conn]
    -> projector_3 (sequence: encoder_hidden_states)                         [B, P+Q, D_joint]
       projector_2 (mean over the sequence: pooled_projections)              [B, D_pooled]

As in the reference, the whole sequence (left padding included) goes through the connector, so a prompt's
embedding depends on the longest prompt of its batch: encode a group's prompts together and keep the
embeddings (the rollout records them) rather than re-encoding in a different batch. For classifier-free guidance
the negative is encoded IN THAT SAME left-padded batch, as DeepGen's ``generate`` and the DeepGen-RL trainer do
(``prompts + cfg_prompts`` in one tokenizer call and one LLM forward): its embedding has the positives' length and
their padding. Text-to-image negative: ``chat_text("")``; an edit's: its own source images with an empty
instruction (prompt_format.py).

Attribute names (``lmm``, ``transformer``, ``vae``, ``connector``, ``projector_1..3``, ``meta_queries``) are the
key prefixes of real DeepGen checkpoints; do not rename them.
"""

from __future__ import annotations

import logging
import math

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from ..core.model_names import TrainableModuleSet
from .connector import ConnectorConfig, ConnectorEncoder
from .kontext import ReferenceLatents
from .prompt_padding import pad_floor
# The templates live in prompt_format.py; tiny.py and model/__init__.py import them from here too.
from .prompt_format import (CHAT_TEMPLATE, GENERATION_TEMPLATE, NEGATIVE_PROMPT, FormattedPrompts,  # noqa: F401
                            chat_text, format_edit_prompts, format_prompts, template_tokens)
from .vision_inputs import prepare_vision_inputs, scatter_image_features, vision_side_multiple
from .unreachable import freeze_dead_dit_parts, freeze_unreachable_llm_parts

logger = logging.getLogger(__name__)
FUSION_LAYER_STRIDE = 6

# Attribute names of each trainable set: one entry per --trainable_modules choice (tests/test_config_modules.py).
CONNECTOR_MODULES = ("connector", "projector_1", "projector_2", "projector_3", "meta_queries")
TRAINABLE_MODULES: dict[TrainableModuleSet, tuple[str, ...]] = {
    "dit": ("transformer",),
    "dit_connector": ("transformer",) + CONNECTOR_MODULES,
    "dit_connector_llm": ("transformer", "lmm") + CONNECTOR_MODULES,
}


def fusion_layer_indices(num_decoder_layers: int, num_fusion_layers: int) -> list[int]:
    """Indices into the ``hidden_states`` tuple (entry 0 = embeddings): L-1, L-7, L-13, ..., first n of them."""
    indices = list(range(num_decoder_layers - 1, 0, -FUSION_LAYER_STRIDE))[:num_fusion_layers]
    if len(indices) < num_fusion_layers:
        raise ValueError(
            f"--num_fusion_layers {num_fusion_layers} needs an LLM with at least "
            f"{FUSION_LAYER_STRIDE * (num_fusion_layers - 1) + 2} decoder layers; this one has {num_decoder_layers}."
        )
    return indices


class DeepGenModel(nn.Module):
    def __init__(
        self,
        lmm: Qwen2_5_VLForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        connector_config: ConnectorConfig,
        num_queries: int = 128,
        num_fusion_layers: int = 6,
        max_prompt_length: int = 1024,
    ):
        super().__init__()
        self.lmm = lmm
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        minimum = template_tokens(tokenizer) + 1
        if max_prompt_length < minimum:
            raise ValueError(f"--max_prompt_length {max_prompt_length} leaves no room for the prompt: the chat "
                             f"template alone takes {minimum - 1} tokens; use at least {minimum} (default 1024).")
        self.max_prompt_length = max_prompt_length
        self._warned_truncation = False

        llm_hidden = lmm.config.text_config.hidden_size
        self.fusion_layers = fusion_layer_indices(lmm.config.text_config.num_hidden_layers, num_fusion_layers)
        self.connector = ConnectorEncoder(connector_config)
        self.projector_1 = nn.Linear(llm_hidden * num_fusion_layers, connector_config.hidden_size)
        self.projector_2 = nn.Linear(connector_config.hidden_size, transformer.config.pooled_projection_dim)
        self.projector_3 = nn.Linear(connector_config.hidden_size, transformer.config.joint_attention_dim)
        # Zero-initialised output projectors as the reference: a fresh connector starts as "no conditioning".
        for projector in (self.projector_2, self.projector_3):
            nn.init.zeros_(projector.weight)
            nn.init.zeros_(projector.bias)
        self.meta_queries = nn.Parameter(torch.randn(num_queries, llm_hidden) / math.sqrt(llm_hidden))
        self.vae.requires_grad_(False)
        self.unreachable_parameters: list[str] = []

    # ----- properties -----
    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        # One parameter's dtype, as predict_velocity: diffusers' `transformer.dtype` walks every submodule, a cost
        # paid on every sampler step and training chunk (benchmarks/bench_train_step.py).
        return next(self.transformer.parameters()).dtype

    @property
    def num_queries(self) -> int:
        return self.meta_queries.shape[0]

    @property
    def source_side_multiple(self) -> int:
        """Edit sources' sides are multiples of this: whole DiT patches of latents (8 * patch size) and, scaled
        by 28/32 for the vision tower, whole merged patches (model/vision_inputs.py): 32 for the real model."""
        dit = 2 ** (len(self.vae.config.block_out_channels) - 1) * self.transformer.config.patch_size
        return math.lcm(dit, vision_side_multiple(self.lmm.config.vision_config))

    # ----- training set-up -----
    def set_trainable(self, trainable_modules: str) -> list[str]:
        """Freeze everything, then unfreeze the attribute set named by ``--trainable_modules`` except the parts no
        gradient can reach (model/unreachable.py); returns the attribute names."""
        if trainable_modules not in TRAINABLE_MODULES:
            raise ValueError(
                f"--trainable_modules must be one of {', '.join(TRAINABLE_MODULES)}; got {trainable_modules!r}."
            )
        self.requires_grad_(False)
        names = list(TRAINABLE_MODULES[trainable_modules])
        for name in names:
            getattr(self, name).requires_grad_(True)
        self.unreachable_parameters = freeze_dead_dit_parts(self.transformer)
        if "lmm" in names:
            self.unreachable_parameters += freeze_unreachable_llm_parts(self.lmm, self.fusion_layers)
        return names

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        self.connector.gradient_checkpointing = True
        if any(p.requires_grad for p in self.lmm.parameters()):
            self.lmm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ----- conditioning -----
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (prompt_embeds [B, P+Q, D_joint], pooled [B, D_pooled]); P <= --max_prompt_length.

        Not wrapped in no_grad: gradients reach the LLM and connector when they are trainable.
        """
        return self(self.format_prompts(prompts).texts)

    def format_prompts(self, prompts: list[str]) -> FormattedPrompts:
        """Chat texts within --max_prompt_length tokens: a long prompt loses the end of its own text, never the
        template (prompt_format.py). Warns once per process; the trainer counts truncated prompts per step."""
        formatted = format_prompts(self.tokenizer, prompts, self.max_prompt_length)
        if any(formatted.truncated) and not self._warned_truncation:
            self._warned_truncation = True
            index = formatted.truncated.index(True)
            logger.warning("prompts longer than --max_prompt_length %d tokens (chat template included) lose the end "
                           "of their text, e.g. %r -> %r; raise --max_prompt_length to keep them whole (the "
                           "data/truncated_prompts metric counts them).", self.max_prompt_length, prompts[index],
                           formatted.texts[index])
        return formatted

    def encode_prompt_and_negative(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """Prompts and the CFG negative ``chat_text("")`` in ONE left-padded batch and LLM forward (the reference's
        ``prompts + cfg_prompts``) -> (prompt_embeds [B, L, D_joint], pooled [B, D_pooled], negative_embeds
        [1, L, D_joint], negative_pooled [1, D_pooled]). The negative is the same for every prompt, so one row of
        it is encoded (a row's embedding depends only on its own tokens and the batch's padded length)."""
        texts = self.format_prompts(prompts).texts + [chat_text(NEGATIVE_PROMPT)]
        embeds, pooled = self(texts)
        return embeds[:-1], pooled[:-1], embeds[-1:], pooled[-1:]

    def encode_edit_prompt(self, instructions: list[str], source_images: list[list[torch.Tensor]]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit instructions, each with its source images [3, H, W] in [0, 1], through the vision tower and the
        LLM -> (prompt_embeds [B, P+Q, D_joint], pooled [B, D_pooled]) (Kontext,
        docs/upstream_compatibility.md#editing-kontext)."""
        return self(self._edit_texts(instructions, source_images), source_images)

    def encode_edit_prompt_and_negative(self, instructions: list[str], source_images: list[list[torch.Tensor]]
                                        ) -> tuple[torch.Tensor, ...]:
        """Edit instructions and their CFG negatives (each the SAME source images with an empty instruction) in
        one left-padded batch and LLM forward, the sources through the vision tower once, as DeepGen's
        ``generate`` -> (prompt_embeds [B, L, D_joint], pooled [B, D_pooled], negative_embeds [B, L, D_joint],
        negative_pooled [B, D_pooled]); row b's negative carries row b's sources."""
        texts = (self._edit_texts(instructions, source_images)
                 + self._edit_texts([NEGATIVE_PROMPT] * len(instructions), source_images))
        embeds, pooled = self(texts, list(source_images) * 2)
        count = len(instructions)
        return embeds[:count], pooled[:count], embeds[count:], pooled[count:]

    def _edit_texts(self, instructions: list[str], source_images: list[list[torch.Tensor]]) -> list[str]:
        return format_edit_prompts(self.tokenizer, instructions, [len(row) for row in source_images],
                                   self.max_prompt_length).texts

    def forward(self, texts: list[str], images: list[list[torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-formatted texts (and, for editing, per text its images) -> (prompt_embeds, pooled). Use
        ``encode_prompt`` / ``encode_prompt_and_negative`` / ``encode_edit_prompt`` /
        ``encode_edit_prompt_and_negative``.

        The conditioning runs as this module's forward, not a plain method, because it reads the top-level
        parameter ``meta_queries`` directly: under DeepSpeed ZeRO-3 a module's own parameters are gathered only
        inside its forward (and re-gathered for its backward), elsewhere they are empty partitions.
        """
        vision = None
        if images is not None:
            if self.lmm.model.visual is None:
                raise RuntimeError("edit prompts need the Qwen2.5-VL vision tower, which was dropped for a "
                                   "text-to-image run (model/vision_tower.py)")
            vision = prepare_vision_inputs(self.lmm.config.vision_config, texts, images)
            texts = vision.texts
        return self._encode_chat_texts(texts, vision)

    def _encode_chat_texts(self, texts: list[str], vision=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.connect_fused_states(self.fused_llm_states(texts, vision))

    def fused_llm_states(self, texts: list[str], vision=None) -> torch.Tensor:
        """Chat texts (left-padded to the longest) + meta queries through the LLM -> its fusion layers' hidden
        states concatenated, [B, P+Q, F * D_llm]. Called directly only outside ZeRO-3 (it reads ``meta_queries``;
        see ``forward``): the tiny model's pretraining caches these for its frozen LLM (model/tiny_pretrain.py)."""
        # No tokenizer truncation: it would cut the template's end; encode_prompt already fitted the texts.
        tokens = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=True,
        )
        floor = pad_floor() if vision is None else 0  # a GRPO step's global padded length (prompt_padding.py)
        if floor > tokens.input_ids.shape[1]:
            tokens = self.tokenizer(texts, return_tensors="pt", padding="max_length", max_length=floor,
                                    padding_side="left", add_special_tokens=True)
        batch = tokens.input_ids.shape[0]
        # Query positions carry token id 0; positions come from the LLM's own (m)RoPE index function, run on the
        # CPU token ids: its per-row masking and .tolist() would be host syncs on a GPU and cannot run on the
        # real-size ``meta`` model (model/meta.py) at all.
        input_ids = torch.cat([tokens.input_ids, tokens.input_ids.new_zeros(batch, self.num_queries)], dim=1)
        attention_mask = torch.cat([tokens.attention_mask, tokens.attention_mask.new_ones(batch, self.num_queries)], 1)
        image_token_id = self.lmm.config.image_token_id
        position_ids, _ = self.lmm.model.get_rope_index(
            input_ids, attention_mask=attention_mask,
            mm_token_type_ids=torch.zeros_like(input_ids) if vision is None else (input_ids == image_token_id).long(),
            **({} if vision is None else {"image_grid_thw": vision.occurrence_grid_thw}),
        )
        position_ids, attention_mask = position_ids.to(self.device), attention_mask.to(self.device)
        text_embeds = self.lmm.get_input_embeddings()(tokens.input_ids.to(self.device))
        if vision is not None:
            # One tower pass over the distinct images; an image's tokens are reused wherever it occurs.
            features = self.lmm.model.get_image_features(vision.pixel_values.to(self.device),
                                                         vision.image_grid_thw.to(self.device)).pooler_output
            occurrences = torch.cat([features[index] for index in vision.image_index])
            text_embeds = scatter_image_features(text_embeds, tokens.input_ids, image_token_id, occurrences)
        queries = self.meta_queries[None].expand(batch, -1, -1).to(text_embeds.dtype)
        inputs_embeds = torch.cat([text_embeds, queries], dim=1)
        hidden_states = self.lmm.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=True, use_cache=False,
        ).hidden_states
        return torch.cat([hidden_states[i] for i in self.fusion_layers], dim=-1)

    def connect_fused_states(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused LLM states [B, P+Q, F * D_llm] -> connector -> (prompt_embeds [B, P+Q, D_joint],
        pooled [B, D_pooled])."""
        connected = self.connector(self.projector_1(fused.to(self.projector_1.weight.dtype)))
        return self.projector_3(connected), self.projector_2(connected.mean(dim=1))

    # ----- diffusion -----
    def predict_velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
        reference_latents: ReferenceLatents | None = None,
    ) -> torch.Tensor:
        """latents [N, C, h, w], sigmas [N] in [0, 1] -> v [N, C, h, w] (v = eps - x0), in the latents' dtype.

        ``reference_latents`` (editing): per row its source latents [C, h_r, w_r] (``encode_reference_images``);
        None for text-to-image, whose DiT call is then exactly diffusers' SD3 forward.
        """
        # Passed only when given: a plain SD3 DiT (built outside our loaders) still runs text-to-image.
        references = {} if reference_latents is None else {"reference_latents": reference_latents}
        # Not `self.transformer.dtype`: diffusers computes that by walking every submodule, a measurable cost
        # on each of the T denoising steps.
        dtype = next(self.transformer.parameters()).dtype
        velocity = self.transformer(
            hidden_states=latents.to(dtype),
            # float32 as diffusers' SD3 pipeline and the reference pass it (the scheduler's timesteps): the DiT
            # casts after its sinusoidal projection. In bf16 first, t would move by up to 1.9 and the projection
            # by up to 43%.
            timestep=sigmas.to(torch.float32) * 1000.0,
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
            **references,
        )[0]
        return velocity.to(latents.dtype)

    def sigma_schedule(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """float32 [T + 1] sigmas from ~1 down to 0, with the scheduler's (possibly resolution-dependent) shift."""
        config = self.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            # Imported here: the SD3 pipeline module pulls in every text encoder class of transformers.
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            _, h, w = self.latent_shape(height, width)
            seq_len = (h // self.transformer.config.patch_size) * (w // self.transformer.config.patch_size)
            mu = calculate_shift(seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                                 config.max_shift)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(num_inference_steps, device="cpu", mu=mu)
        return scheduler.sigmas.to(torch.float32)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.transformer.config.in_channels, height // scale, width // scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, C, h, w] -> images [N, 3, H, W] float in [0, 1]."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_reference_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Source images [3, H, W] in [0, 1] (H, W multiples of 8 * patch size) -> DiT latents [C, h, w] each."""
        multiple = 2 ** (len(self.vae.config.block_out_channels) - 1) * self.transformer.config.patch_size
        latents = []
        for image in images:
            if image.shape[-1] % multiple or image.shape[-2] % multiple:
                raise ValueError(f"source image of size {tuple(image.shape[-2:])} (H, W): both must be multiples "
                                 f"of {multiple} pixels for the DiT; resize it when loading the edit dataset")
            posterior = self.vae.encode((image[None] * 2 - 1).to(self.device, self.vae.dtype)).latent_dist
            config = self.vae.config
            # DeepGen samples the posterior here; we keep its MEAN so that a rollout, its recompute and the
            # reference model all see the same references (a fresh sample each time would make the first
            # chunk's ratio differ from 1 by the sampling noise, not by any policy change).
            latents.append(((posterior.mean - (config.shift_factor or 0.0)) * config.scaling_factor)[0])
        return latents

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> latents [N, C, h, w], shifted and scaled for the DiT."""
        config = self.vae.config
        posterior = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return (posterior.sample(generator) - (config.shift_factor or 0.0)) * config.scaling_factor
