"""ImageReward's checkpoint (``ImageReward.pt``: its BLIP + MLP module) mapped onto transformers' BLIP classes.

ImageReward key layout (``{i}`` a block index)::

    blip.visual_encoder.cls_token [1, 1, Wv]   .pos_embed [1, g*g+1, Wv]   .patch_embed.proj.{weight,bias}
    blip.visual_encoder.blocks.{i}.norm1 / norm2.{weight,bias}        (BLIP's timm-style ViT, LayerNorm eps 1e-6)
    blip.visual_encoder.blocks.{i}.attn.qkv.{weight,bias} [3Wv, Wv]   .attn.proj.{weight,bias}
    blip.visual_encoder.blocks.{i}.mlp.fc1 / fc2.{weight,bias}        blip.visual_encoder.norm.{weight,bias}
    blip.text_encoder.embeddings.{word_embeddings,position_embeddings}.weight, .LayerNorm.{weight,bias}
    blip.text_encoder.encoder.layer.{i}.attention.self.{query,key,value}, .attention.output.{dense,LayerNorm}
    blip.text_encoder.encoder.layer.{i}.crossattention.self.{query,key,value}, .crossattention.output.{dense,LayerNorm}
    blip.text_encoder.encoder.layer.{i}.intermediate.dense, .output.{dense,LayerNorm}   (BLIP's med.py BERT)
    mlp.layers.{0,2,4,6,7}.{weight,bias}                              (see mlp_head)

transformers' BlipTextModel keeps BLIP's med.py names, so the text encoder maps by prefix alone; the vision tower
is renamed (table below). Keys outside these three parts (BLIP's ITC projections ``blip.vision_proj`` /
``blip.text_proj``, momentum copies, ...) are not used by the score and are skipped; a saved ``position_ids``
buffer is rebuilt by transformers. Head counts are not in the tensors: BLIP's ViT-L and BERT-base use 64-wide heads.
"""

from __future__ import annotations

import math

from deepgen_rl.rewards.servers.scorers.checkpoints import StateDict, count_blocks

VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
HEAD_WIDTH = 64
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def map_image_reward_to_hf(state: StateDict) -> tuple[StateDict, list[str]]:
    """ImageReward keys -> ``ImageRewardModel`` keys (vision_model., text_encoder., mlp.), and the skipped keys."""
    mapped: StateDict = {}
    skipped, unknown = [], []
    for key, value in state.items():
        if key.startswith(TEXT):
            if not key.endswith("position_ids"):
                mapped["text_encoder." + key[len(TEXT):]] = value
        elif key.startswith(HEAD):
            mapped[key] = value
        elif key.startswith(VISION):
            target = _vision_key(key[len(VISION):])
            if target is None:
                unknown.append(key)
            else:
                mapped["vision_model." + target] = value
        else:
            skipped.append(key)
    if unknown:
        raise ValueError(f"ImageReward checkpoint has vision keys this mapping does not know: {', '.join(unknown[:8])}.")
    return mapped, skipped


def _vision_key(rest: str):
    if rest in _VISION_TOP:
        return _VISION_TOP[rest]
    if rest.startswith("blocks."):
        index, _, part = rest[len("blocks."):].partition(".")
        module, _, leaf = part.rpartition(".")
        if module in _VISION_BLOCK:
            return f"encoder.layers.{index}.{_VISION_BLOCK[module]}.{leaf}"
    return None


def blip_configs(state: StateDict):
    """(BlipVisionConfig, BlipTextConfig) of an ImageReward state dict: sizes from the tensors."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, _, patch, _ = state[VISION + "patch_embed.proj.weight"].shape
    grid = math.isqrt(state[VISION + "pos_embed"].shape[1] - 1)
    vocab, hidden = state[TEXT + "embeddings.word_embeddings.weight"].shape
    vision = BlipVisionConfig(hidden_size=width, num_attention_heads=width // HEAD_WIDTH,
                              intermediate_size=state[VISION + "blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=count_blocks(state, VISION + "blocks."), image_size=grid * patch,
                              patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
                          num_attention_heads=hidden // HEAD_WIDTH,
                          intermediate_size=state[TEXT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                          num_hidden_layers=count_blocks(state, TEXT + "encoder.layer."),
                          max_position_embeddings=state[TEXT + "embeddings.position_embeddings.weight"].shape[0],
                          hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0,
                          bos_token_id=vocab - 2, sep_token_id=None)  # [DEC]: the first token BLIP adds; unused here
    return vision, text
