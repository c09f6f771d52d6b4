"""The Kontext variant of the SD3 DiT: reference-image latents as extra image tokens
(docs/upstream_compatibility.md#editing-kontext).

UniPic2-SD3.5M-Kontext-2B's ``transformer/config.json`` names ``SD3Transformer2DKontextModel``: the parameters
of diffusers' ``SD3Transformer2DModel`` with a forward that also reads reference latents. For N rows:

    target latents [N, C, h, w]          -> pos_embed (patchify + cropped sin-cos positions)   [N, S, D]
    references, row n: [C, h_r, w_r] ... -> the SAME pos_embed, each at its own size            [n_tokens_n, D]
                                            concatenated per row, padded to M with a mask       [N, M, D], [N, M]
    [target ++ references] and the text tokens run through every joint block; padded reference tokens are
    masked out as attention KEYS (joint and dual attention), so they never reach a real token;
    output: the target tokens only -> norm_out -> proj_out -> unpatchify                        [N, C, h, w]

Without references the forward is diffusers' own, so text-to-image is bit-identical to the plain DiT.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# Per row, its reference latents [C, h_r, w_r] (any number, any sizes divisible by the patch size).
ReferenceLatents = Sequence[Sequence[torch.Tensor]]


def pack_reference_tokens(token_lists: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, token blocks [n_i, D] -> (tokens [N, M, D] zero-padded, mask [N, M] bool, True = real token).

    M = the longest row's total; a row without references is all padding.
    """
    rows = [torch.cat(list(blocks), dim=0) if len(blocks) else None for blocks in token_lists]
    example = next(row for row in rows if row is not None)
    longest = max(row.shape[0] if row is not None else 0 for row in rows)
    tokens = example.new_zeros(len(rows), longest, example.shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=example.device)
    for index, row in enumerate(rows):
        if row is not None:
            tokens[index, : row.shape[0]] = row
            mask[index, : row.shape[0]] = True
    return tokens, mask


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch: int, channels: int) -> torch.Tensor:
    """tokens [N, (height/patch)*(width/patch), patch*patch*channels] -> latents [N, channels, height, width]."""
    rows, cols = height // patch, width // patch
    grid = tokens.reshape(tokens.shape[0], rows, cols, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", grid).reshape(tokens.shape[0], channels, rows * patch, cols * patch)


class MaskedJointAttnProcessor:
    """SD3's joint attention with an optional key mask over the image tokens.

    ``token_mask`` [N, L_img] bool (True = attend) masks image-token keys; text-token keys (joint attention)
    are always attended. Without a mask it IS diffusers' processor, so unmasked calls are bit-identical.
    """

    def __init__(self):
        self.unmasked = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, token_mask=None):
        if token_mask is None:
            return self.unmasked(attn, hidden_states, encoder_hidden_states, attention_mask)
        num_image = hidden_states.shape[1]
        query, key, value = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = _norm(attn.norm_q, query), _norm(attn.norm_k, key)
        key_mask = token_mask
        if encoder_hidden_states is not None:
            context = [_heads(attn, proj(encoder_hidden_states))
                       for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            context[0], context[1] = _norm(attn.norm_added_q, context[0]), _norm(attn.norm_added_k, context[1])
            query, key, value = (torch.cat([x, c], dim=2) for x, c in zip((query, key, value), context))
            key_mask = torch.cat([token_mask, token_mask.new_ones(token_mask.shape[0], context[1].shape[2])], 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask[:, None, None, :])
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :num_image]))
        if encoder_hidden_states is None:
            return image_out
        context_out = out[:, num_image:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image_out, context_out


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    """[N, L, heads*d] -> [N, heads, L, d]."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class SD3Transformer2DKontextModel(SD3Transformer2DModel):
    """diffusers' SD3 DiT (same config, same parameters, same checkpoints) whose forward also takes
    ``reference_latents`` (see the module docstring). ``__init__`` is inherited unchanged: diffusers builds models
    from its signature, and a Kontext checkpoint is an SD3 one."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                pooled_projections: torch.Tensor = None, timestep: torch.Tensor = None,
                reference_latents: ReferenceLatents | None = None, return_dict: bool = True, **kwargs):
        """hidden_states [N, C, h, w]; reference_latents: None (text-to-image: diffusers' forward, untouched) or
        one list of [C, h_r, w_r] per row -> velocity [N, C, h, w] of the target tokens only."""
        if reference_latents is None:
            return super().forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=pooled_projections, timestep=timestep,
                                   return_dict=return_dict, **kwargs)
        if kwargs:
            raise TypeError(f"the Kontext (reference-image) forward does not take {sorted(kwargs)}")
        if len(reference_latents) != hidden_states.shape[0]:
            raise ValueError(f"reference_latents has {len(reference_latents)} rows for {hidden_states.shape[0]} "
                             "target latents: give one (possibly empty) list of references per row")
        tokens, mask = pack_reference_tokens(self.embed_references(reference_latents, hidden_states.dtype))
        output = self.forward_with_reference_tokens(hidden_states, encoder_hidden_states, pooled_projections,
                                                    timestep, tokens, mask)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def embed_references(self, reference_latents: ReferenceLatents, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """Patch-embed every reference with the DiT's own ``pos_embed`` at its own size -> per row [n_r, D] blocks.

        References of one shape are embedded in one call (a group of a GRPO batch shares its sources).
        """
        by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for row, references in enumerate(reference_latents):
            for index, latent in enumerate(references):
                if latent.ndim != 3 or latent.shape[0] != self.config.in_channels:
                    raise ValueError(f"reference latent of row {row} has shape {tuple(latent.shape)}; expected "
                                     f"[{self.config.in_channels}, h, w]")
                by_shape[tuple(latent.shape)].append((row, index))
        if not by_shape:
            raise ValueError("reference_latents holds no reference at all: pass None for text-to-image")
        blocks: list[list[torch.Tensor | None]] = [[None] * len(refs) for refs in reference_latents]
        for slots in by_shape.values():
            stacked = torch.stack([reference_latents[row][index] for row, index in slots])
            stacked = stacked.to(self.pos_embed.proj.weight.device, dtype)
            embedded = self.pos_embed(stacked)  # [R, n_r, D]
            for (row, index), tokens in zip(slots, embedded):
                blocks[row][index] = tokens
        return blocks

    def forward_with_reference_tokens(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                                      pooled_projections: torch.Tensor, timestep: torch.Tensor,
                                      reference_tokens: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, C, h, w], reference_tokens [N, M, D] (already patch-embedded), reference_mask [N, M]
        -> velocity [N, C, h, w]. The joint blocks of diffusers run as they are, with the masking processor."""
        self._use_masked_attention()
        height, width = hidden_states.shape[-2:]
        target = self.pos_embed(hidden_states).contiguous()  # [N, S, D]
        num_target = target.shape[1]
        tokens = torch.cat([target, reference_tokens.to(target.dtype)], dim=1)
        token_mask = torch.cat([reference_mask.new_ones(reference_mask.shape[0], num_target), reference_mask], 1)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        attention_kwargs = {"token_mask": token_mask}
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, tokens = self._gradient_checkpointing_func(block, tokens, context, temb, attention_kwargs)
            else:
                context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                        joint_attention_kwargs=attention_kwargs)
        # norm_out and proj_out act per token: dropping the reference tokens first changes nothing but cost.
        out = self.proj_out(self.norm_out(tokens[:, :num_target], temb))
        return unpatchify(out, height, width, self.config.patch_size, self.out_channels)

    def _use_masked_attention(self) -> None:
        # Installed on first use rather than in __init__ (kept inherited, see the class docstring); the processor
        # is diffusers' own when no mask is passed, so the text-to-image forward stays bit-identical afterwards.
        if not isinstance(self.transformer_blocks[0].attn.processor, MaskedJointAttnProcessor):
            self.set_attn_processor(MaskedJointAttnProcessor())
