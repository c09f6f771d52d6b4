"""Tiny checkpoints in the published key layouts of the model scorers, written by hand (helpers, not tests).

The key names are those of the real files (documented in deepgen_rl/rewards/servers/scorers/open_clip_keys.py,
blip_keys.py, mlp_head.py): open_clip's CLIP (HPS_v2.1_compressed.pt), ImageReward.pt (BLIP + MLP) and the LAION
aesthetic MLP; only the sizes are tiny. Also a tiny transformers CLIP folder (PickScore's format, and the CLIP
the aesthetic predictor reads) and tiny tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_IMAGE, CLIP_PATCH = 32, 8
BLIP_IMAGE, BLIP_PATCH = 32, 8
WORDS = ["a", "red", "cat", "blue", "dog", "photo", "of", "the", "sign", "green"]


def clip_processor(image_size: int = CLIP_IMAGE):
    """A CLIP processor with a character-level BPE vocabulary; like the real one, end-of-text is the largest id."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    vocab = {}
    for char in sorted(ByteLevel.alphabet()):  # no merges needed
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!")
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                  "width": image_size})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def write_clip_folder(path: Path) -> Path:
    """A tiny transformers CLIPModel + processor folder (PickScore_v1's format; the aesthetic predictor's CLIP)."""
    from transformers import CLIPConfig, CLIPModel

    processor = clip_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=CLIP_IMAGE, patch_size=CLIP_PATCH),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _rand(generator: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def _layer_norm(state: dict, key: str, width: int, g: torch.Generator) -> None:
    state[f"{key}.weight"] = 1 + _rand(g, width)
    state[f"{key}.bias"] = _rand(g, width)


def _linear(state: dict, key: str, n_in: int, n_out: int, g: torch.Generator, bias: bool = True) -> None:
    state[f"{key}.weight"] = _rand(g, n_out, n_in, scale=n_in ** -0.5)
    if bias:
        state[f"{key}.bias"] = _rand(g, n_out)


def _open_clip_block(state: dict, prefix: str, width: int, g: torch.Generator) -> None:
    _layer_norm(state, prefix + "ln_1", width, g)
    state[prefix + "attn.in_proj_weight"] = _rand(g, 3 * width, width, scale=width ** -0.5)
    state[prefix + "attn.in_proj_bias"] = _rand(g, 3 * width)
    _linear(state, prefix + "attn.out_proj", width, width, g)
    _layer_norm(state, prefix + "ln_2", width, g)
    _linear(state, prefix + "mlp.c_fc", width, 4 * width, g)
    _linear(state, prefix + "mlp.c_proj", 4 * width, width, g)


# Tiny open_clip sizes: head widths as ViT-H-14's (image 80, text 64), so 2 heads in each tower.
OC_VISION_WIDTH, OC_TEXT_WIDTH, OC_EMBED, OC_CONTEXT, OC_LAYERS = 160, 128, 16, 20, 2


def open_clip_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (HPSv2.1's layout) with tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    grid = CLIP_IMAGE // CLIP_PATCH
    s["positional_embedding"] = _rand(g, OC_CONTEXT, OC_TEXT_WIDTH)
    s["text_projection"] = _rand(g, OC_TEXT_WIDTH, OC_EMBED, scale=OC_TEXT_WIDTH ** -0.5)
    s["logit_scale"] = torch.tensor(4.6052)
    s["token_embedding.weight"] = _rand(g, vocab_size, OC_TEXT_WIDTH, scale=0.5)
    _layer_norm(s, "ln_final", OC_TEXT_WIDTH, g)
    s["attn_mask"] = torch.full((OC_CONTEXT, OC_CONTEXT), float("-inf")).triu(1)  # saved by some open_clip versions
    for i in range(OC_LAYERS):
        _open_clip_block(s, f"transformer.resblocks.{i}.", OC_TEXT_WIDTH, g)
    s["visual.class_embedding"] = _rand(g, OC_VISION_WIDTH, scale=0.5)
    s["visual.positional_embedding"] = _rand(g, grid * grid + 1, OC_VISION_WIDTH)
    s["visual.proj"] = _rand(g, OC_VISION_WIDTH, OC_EMBED, scale=OC_VISION_WIDTH ** -0.5)
    s["visual.conv1.weight"] = _rand(g, OC_VISION_WIDTH, 3, CLIP_PATCH, CLIP_PATCH, scale=0.05)
    _layer_norm(s, "visual.ln_pre", OC_VISION_WIDTH, g)
    _layer_norm(s, "visual.ln_post", OC_VISION_WIDTH, g)
    for i in range(OC_LAYERS):
        _open_clip_block(s, f"visual.transformer.resblocks.{i}.", OC_VISION_WIDTH, g)
    return s


def mlp_head_state_dict(n_in: int, widths=(32, 16, 8, 4), seed: int = 2, prefix: str = "layers.") -> dict:
    """The aesthetic / ImageReward head layout: Linear at indices 0, 2, 4, 6, 7 (Dropout between, no weights)."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    sizes = [n_in, *widths, 1]
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        _linear(s, f"{prefix}{index}", a, b, g)
    return s


def bert_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


BLIP_VISION_WIDTH, BLIP_TEXT_WIDTH, BLIP_LAYERS, BLIP_MAX_POSITIONS = 128, 128, 2, 40


def image_reward_state_dict(vocab_size: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """ImageReward.pt's layout (BLIP ViT + med BERT with cross-attention + MLP head), tiny, plus the unused ITC
    projections and the position_ids buffer the real file carries."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    v, t, grid = "blip.visual_encoder.", "blip.text_encoder.", BLIP_IMAGE // BLIP_PATCH
    wv, wt = BLIP_VISION_WIDTH, BLIP_TEXT_WIDTH
    s[v + "cls_token"] = _rand(g, 1, 1, wv, scale=0.5)
    s[v + "pos_embed"] = _rand(g, 1, grid * grid + 1, wv)
    s[v + "patch_embed.proj.weight"] = _rand(g, wv, 3, BLIP_PATCH, BLIP_PATCH, scale=0.05)
    s[v + "patch_embed.proj.bias"] = _rand(g, wv)
    for i in range(BLIP_LAYERS):
        b = f"{v}blocks.{i}."
        _layer_norm(s, b + "norm1", wv, g)
        _linear(s, b + "attn.qkv", wv, 3 * wv, g)
        _linear(s, b + "attn.proj", wv, wv, g)
        _layer_norm(s, b + "norm2", wv, g)
        _linear(s, b + "mlp.fc1", wv, 4 * wv, g)
        _linear(s, b + "mlp.fc2", 4 * wv, wv, g)
    _layer_norm(s, v + "norm", wv, g)
    s[t + "embeddings.word_embeddings.weight"] = _rand(g, vocab_size, wt, scale=0.5)
    s[t + "embeddings.position_embeddings.weight"] = _rand(g, BLIP_MAX_POSITIONS, wt)
    s[t + "embeddings.position_ids"] = torch.arange(BLIP_MAX_POSITIONS)[None]
    _layer_norm(s, t + "embeddings.LayerNorm", wt, g)
    for i in range(BLIP_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for part, kv_width in (("attention", wt), ("crossattention", wv)):
            _linear(s, f"{b}{part}.self.query", wt, wt, g)
            _linear(s, f"{b}{part}.self.key", kv_width, wt, g)
            _linear(s, f"{b}{part}.self.value", kv_width, wt, g)
            _linear(s, f"{b}{part}.output.dense", wt, wt, g)
            _layer_norm(s, f"{b}{part}.output.LayerNorm", wt, g)
        _linear(s, b + "intermediate.dense", wt, 2 * wt, g)
        _linear(s, b + "output.dense", 2 * wt, wt, g)
        _layer_norm(s, b + "output.LayerNorm", wt, g)
    _linear(s, "blip.vision_proj", wv, 16, g)
    _linear(s, "blip.text_proj", wt, 16, g)
    s.update(mlp_head_state_dict(wt, seed=seed + 1, prefix="mlp.layers."))
    return s


def write_all(root: Path) -> dict[str, str]:
    """Every tiny file a scorer server needs, as the environment variables that point at them."""
    clip_dir = write_clip_folder(root / "clip")
    processor_dir = root / "clip_h_processor"
    clip_processor().save_pretrained(processor_dir)
    tokenizer = clip_processor().tokenizer
    torch.save({"state_dict": open_clip_state_dict(len(tokenizer)), "epoch": 1}, root / "HPS_v2.1_compressed.pt")
    torch.save(mlp_head_state_dict(16), root / "aesthetic_mlp.pth")
    bert_dir = root / "bert"
    bert = bert_tokenizer()
    bert.save_pretrained(bert_dir)
    torch.save(image_reward_state_dict(len(bert) + 2), root / "ImageReward.pt")
    return {"PICKSCORE_MODEL_PATH": str(clip_dir), "HPSV2_CHECKPOINT": str(root / "HPS_v2.1_compressed.pt"),
            "HPSV2_PROCESSOR_PATH": str(processor_dir), "AESTHETIC_MLP_PATH": str(root / "aesthetic_mlp.pth"),
            "AESTHETIC_CLIP_PATH": str(clip_dir), "IMAGEREWARD_CHECKPOINT": str(root / "ImageReward.pt"),
            "IMAGEREWARD_TOKENIZER_PATH": str(bert_dir)}
