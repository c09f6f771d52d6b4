"""Independent forwards of the published architectures, written from their papers' / repos' definitions in plain
torch over the ORIGINAL key layouts (helpers, not tests): what our transformers-mapped scorers must reproduce.

open_clip CLIP (HPSv2): pre-LN transformer blocks with nn.MultiheadAttention over the stacked in_proj, causal text
mask, text pooled at the end-of-text token (the largest id), image pooled at the class token after ln_post.
BLIP (ImageReward): timm-style pre-LN ViT (LayerNorm eps 1e-6); post-LN BERT (eps 1e-12) whose every layer attends
to itself (padding masked) then to all image tokens; the [CLS] output goes through the MLP head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepgen_rl.rewards.servers.scorers.image_reward import SCORE_MEAN, SCORE_STD


def _ln(x, s, key, eps):
    return F.layer_norm(x, x.shape[-1:], s[key + ".weight"], s[key + ".bias"], eps=eps)


def _lin(x, s, key):
    return F.linear(x, s[key + ".weight"], s.get(key + ".bias"))


def _open_clip_block(x, s, p, heads, mask):
    width = x.shape[-1]
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    attention.load_state_dict({"in_proj_weight": s[p + "attn.in_proj_weight"], "in_proj_bias": s[p + "attn.in_proj_bias"],
                               "out_proj.weight": s[p + "attn.out_proj.weight"],
                               "out_proj.bias": s[p + "attn.out_proj.bias"]})
    h = _ln(x, s, p + "ln_1", 1e-5)
    x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = _ln(x, s, p + "ln_2", 1e-5)
    return x + _lin(F.gelu(_lin(h, s, p + "mlp.c_fc")), s, p + "mlp.c_proj")


def _blocks(s, prefix):
    return sorted({int(k[len(prefix):].split(".")[0]) for k in s if k.startswith(prefix)})


@torch.no_grad()
def open_clip_text(s, tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """tokens [n, L] -> text embeddings [n, D] (not normalised)."""
    length = tokens.shape[1]
    x = s["token_embedding.weight"][tokens] + s["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in _blocks(s, "transformer.resblocks."):
        x = _open_clip_block(x, s, f"transformer.resblocks.{i}.", heads, mask)
    x = _ln(x, s, "ln_final", 1e-5)
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ s["text_projection"]


@torch.no_grad()
def open_clip_image(s, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """pixels [n, 3, S, S] -> image embeddings [n, D] (not normalised)."""
    weight = s["visual.conv1.weight"]
    x = F.conv2d(pixels, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # [n, g*g, W]
    cls = s["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = _ln(x, s, "visual.ln_pre", 1e-5)
    for i in _blocks(s, "visual.transformer.resblocks."):
        x = _open_clip_block(x, s, f"visual.transformer.resblocks.{i}.", heads, None)
    return _ln(x[:, 0], s, "visual.ln_post", 1e-5) @ s["visual.proj"]


def _attend(q, k, v, heads, additive_mask=None):
    n, lq, w = q.shape
    split = lambda t: t.reshape(n, t.shape[1], heads, w // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (w // heads) ** 0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, lq, w)


@torch.no_grad()
def blip_vit(s, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """ImageReward's BLIP ViT: pixels [n, 3, S, S] -> image tokens [n, 1 + g*g, Wv]."""
    v = "blip.visual_encoder."
    weight = s[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, s[v + "patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(x), 1, -1), x], dim=1) + s[v + "pos_embed"]
    for i in _blocks(s, v + "blocks."):
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, s, b + "norm1", 1e-6), s, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attend(q, k, val, heads), s, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, s, b + "norm2", 1e-6), s, b + "mlp.fc1")), s, b + "mlp.fc2")
    return _ln(x, s, v + "norm", 1e-6)


@torch.no_grad()
def image_reward(s, pixels, input_ids, attention_mask, heads: int) -> torch.Tensor:
    """ImageReward's published score [n]."""
    t = "blip.text_encoder."
    image = blip_vit(s, pixels, heads)
    x = s[t + "embeddings.word_embeddings.weight"][input_ids] + s[t + "embeddings.position_embeddings.weight"][
        : input_ids.shape[1]]
    x = _ln(x, s, t + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in _blocks(s, t + "encoder.layer."):
        b = f"{t}encoder.layer.{i}."
        for part, keys, mask in (("attention", x, padding), ("crossattention", image, None)):
            context = _attend(_lin(x, s, f"{b}{part}.self.query"), _lin(keys, s, f"{b}{part}.self.key"),
                              _lin(keys, s, f"{b}{part}.self.value"), heads, mask)
            x = _ln(_lin(context, s, f"{b}{part}.output.dense") + x, s, f"{b}{part}.output.LayerNorm", 1e-12)
        x = _ln(_lin(F.gelu(_lin(x, s, b + "intermediate.dense")), s, b + "output.dense") + x, s,
                b + "output.LayerNorm", 1e-12)
    return (linear_head(s, x[:, 0], "mlp.layers.") - SCORE_MEAN) / SCORE_STD


def linear_head(s, features: torch.Tensor, prefix: str = "layers.") -> torch.Tensor:
    """The MLP head: its Linear layers in index order, nothing between them (Dropout at eval) -> [n]."""
    for index in sorted({int(k[len(prefix):].split(".")[0]) for k in s if k.startswith(prefix)}):
        features = _lin(features, s, f"{prefix}{index}")
    return features.squeeze(-1)
