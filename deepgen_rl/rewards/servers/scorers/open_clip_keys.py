"""An open_clip CLIP checkpoint (HPSv2.1's ``HPS_v2.1_compressed.pt``: ViT-H-14) mapped onto transformers'
``CLIPModel``.

open_clip key layout (its ``CLIP`` module; ``{i}`` a block index)::

    token_embedding.weight [V, W]          positional_embedding [L, W]       ln_final.{weight,bias}
    text_projection [W, D] (x @ P)         logit_scale []
    transformer.resblocks.{i}.ln_1 / ln_2.{weight,bias}
    transformer.resblocks.{i}.attn.in_proj_weight [3W, W], attn.in_proj_bias [3W]    (q, k, v stacked)
    transformer.resblocks.{i}.attn.out_proj.{weight,bias}
    transformer.resblocks.{i}.mlp.c_fc.{weight,bias}, mlp.c_proj.{weight,bias}
    visual.conv1.weight [Wv, 3, p, p] (no bias)   visual.class_embedding [Wv]   visual.positional_embedding [g*g+1, Wv]
    visual.ln_pre / visual.ln_post.{weight,bias}  visual.proj [Wv, D]
    visual.transformer.resblocks.{i}.*            (as the text blocks)
    attn_mask                                     (a causal-mask buffer some versions save: ignored, CLIP rebuilds it)

Sizes (widths, depth, context, vocabulary, patch, image size) are read from the tensors; head counts are not in
the tensors and come from the published head widths (ViT-H-14: 80 for the image tower, 64 for the text tower).
open_clip's ViT-H-14 uses exact GELU and LayerNorm eps 1e-5 (QuickGELU is only for OpenAI's own weights).
"""

from __future__ import annotations

import math

import torch

from deepgen_rl.rewards.servers.scorers.checkpoints import StateDict, count_blocks

IGNORED_KEYS = ("attn_mask",)
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_LEVEL = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias",
              "logit_scale": "logit_scale",
              "visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
              "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
              "visual.ln_post.weight": "vision_model.post_layernorm.weight",
              "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def map_open_clip_to_hf(state: StateDict) -> StateDict:
    """open_clip keys -> transformers CLIPModel keys; ValueError naming any key it does not know."""
    mapped: StateDict = {}
    unknown = []
    for key, value in state.items():
        if key in IGNORED_KEYS or key.endswith(".attn_mask"):
            continue
        if key in _TOP_LEVEL:
            mapped[_TOP_LEVEL[key]] = value
        elif key in _TRANSPOSED:
            mapped[_TRANSPOSED[key]] = value.t().contiguous()  # open_clip multiplies x @ P; nn.Linear does x @ W.T
        elif not _map_block(key, value, mapped):
            unknown.append(key)
    if unknown:
        raise ValueError(f"open_clip checkpoint has keys this mapping does not know: {', '.join(unknown[:8])}"
                         + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
                         + " (expected a plain ViT CLIP such as ViT-H-14; layer-scale or custom towers are not supported).")
    return mapped


def _map_block(key: str, value: torch.Tensor, mapped: StateDict) -> bool:
    for source, target in (("transformer.resblocks.", "text_model.encoder.layers."),
                           ("visual.transformer.resblocks.", "vision_model.encoder.layers.")):
        if not key.startswith(source):
            continue
        index, _, part = key[len(source):].partition(".")
        prefix = f"{target}{index}."
        if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = part.rsplit("_", 1)[1]
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                mapped[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            return True
        module, _, leaf = part.rpartition(".")
        if module in _BLOCK_PARTS:
            mapped[f"{prefix}{_BLOCK_PARTS[module]}.{leaf}"] = value
            return True
    return False


def clip_config_from_open_clip(state: StateDict, vision_head_width: int, text_head_width: int,
                               bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """The transformers CLIPConfig of an open_clip state dict (sizes from the tensors, heads from head widths)."""
    from transformers import CLIPConfig

    vision_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vocab, text_width = state["token_embedding.weight"].shape
    for width, head_width, tower in ((vision_width, vision_head_width, "image"), (text_width, text_head_width, "text")):
        if width % head_width:
            raise ValueError(f"open_clip {tower} tower width {width} is not a multiple of the head width {head_width}.")
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=vocab, hidden_size=text_width, num_attention_heads=text_width // text_head_width,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=count_blocks(state, "transformer.resblocks."),
                max_position_embeddings=state["positional_embedding"].shape[0],
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **common)
    vision = dict(hidden_size=vision_width, num_attention_heads=vision_width // vision_head_width,
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=count_blocks(state, "visual.transformer.resblocks."),
                  patch_size=patch, image_size=grid * patch, **common)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["text_projection"].shape[1])
