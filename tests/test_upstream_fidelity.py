"""The conditioning DeepGen's weights were trained with, pinned as literal facts and re-enacted line by line.

Each fact below was read in the upstream code (the public DeepGen fusion model,
``src/models/sd3_kontext/qwen2_5_vl_sd3_hf_dynamic_fusion.py``, "fusion" below; the DeepGen-RL reference trainer,
``deepgen_rl/trainer/grpo_deepgen_trainer.py``, "trainer"; diffusers' SD3 time embedding) and is written here as
a literal, never read from our constants:

- text-to-image user text ``Generate an image: {prompt}`` in the Qwen chat template, left-padded (fusion
  ``prepare_text2image_prompts``); the CFG negative is the EMPTY prompt in that template, in the positives' batch
  (trainer ``cfg_prompts = [""]`` and ``prepare_text2image_prompts(prompts + cfg_prompts)``; fusion ``generate``;
  the SFT's unconditional dropout puts ``''`` in place of a caption);
- edit user text ``{vision blocks}\\n{instruction}`` (fusion ``prepare_image2image_prompts``); the edit negative
  keeps the same vision tokens (fusion ``generate``: ``prompt + cfg_prompt``, ``image_embeds * 2``);
- the vision tower input: the source in [-1, 1] scaled by 28/32 (bilinear), mapped to [0, 1], CLIP mean/std,
  patchified by merge block (fusion ``get_semantic_features_dynamic`` / ``get_semantic_features``);
- the DiT's timestep: float32 scheduler timesteps (trainer ``timestep = t.expand(...)``); diffusers casts to the
  model dtype only after ``time_proj``.
The reference embeddings are computed by re-enacting fusion's ``prepare_forward_input`` (zero query ids, bool
mask, ``get_rope_index``, image tokens in the pads) -> LLM -> layers L-1, L-7, ... -> connector, here in the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepgen_rl.model.tiny import build_tiny_deepgen
from deepgen_rl.sampling import encode_conditioning
from deepgen_rl.sampling.edit_conditioning import EditConditioning

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD = 0  # <|endoftext|> of the tiny tokenizer (pad token); <|im_start|> 1, <|im_end|> 2, <|vision_start|> 3,
# <|vision_end|> 4, <|image_pad|> 5

# "<|im_start|>user\nGenerate an image: a red apple<|im_end|>\n<|im_start|>assistant\n", token by token:
# <|im_start|> user \n Generate Ġan Ġimage : Ġa Ġred Ġapple <|im_end|> \n <|im_start|> assistant \n
APPLE_IDS = [1, 293, 205, 306, 297, 305, 32, 263, 395, 409, 2, 205, 1, 307, 205]
# "... Generate an image: two cats<|im_end|>..." (": two cats" -> : Ġtwo Ġcat s)
CATS_IDS = [1, 293, 205, 306, 297, 305, 32, 377, 382, 89, 2, 205, 1, 307, 205]
# '... Generate an image: a sign that says "OPEN"<|im_end|>...' (Ġa Ġsign Ġthat Ġsays Ġ" O P E N ")
SIGN_IDS = [1, 293, 205, 306, 297, 305, 32, 263, 410, 379, 411, 351, 53, 54, 43, 52, 8, 2, 205, 1, 307, 205]
# The negative "<|im_start|>user\nGenerate an image: <|im_end|>\n<|im_start|>assistant\n": the trailing space of
# "image: " is its own byte token Ġ (227) before <|im_end|>.
NEGATIVE_IDS = [1, 293, 205, 306, 297, 305, 32, 227, 2, 205, 1, 307, 205]
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nmake it red<|im_end|>\n<|im_start|>assistant\n"
# before the pad is expanded: the newline (205) between the vision block and the instruction is DeepGen's.
EDIT_IDS = [1, 293, 205, 3, 5, 4, 205, 83, 71, 81, 75, 227, 327, 395, 2, 205, 1, 307, 205]
# The edit negative: the same vision block, a newline and no instruction.
EDIT_NEGATIVE_IDS = [1, 293, 205, 3, 5, 4, 205, 2, 205, 1, 307, 205]


@pytest.fixture(scope="module")
def model():
    return build_tiny_deepgen(seed=0).eval()


def _synthetic(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth image with sharp edges: [3, H, W] in [0, 1] (bilinear weights are visible on it)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="nearest")[0] * 0.8 + 0.1 * torch.rand(
        3, height, width, generator=generator)


class _Record:
    """Forward (pre-)hooks that keep what reaches a module."""

    def __init__(self):
        self.calls, self.handles = [], []

    def inputs(self, module):
        self.handles.append(module.register_forward_pre_hook(
            lambda _module, args, kwargs: self.calls.append((args, kwargs)), with_kwargs=True))
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _unpad(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    first = next(i for i, token in enumerate(ids) if token != PAD)
    assert all(token == PAD for token in ids[:first])
    return ids[first:]


# ----------------------------------------------------------------------------- the texts the LLM reads


@torch.no_grad()
def test_text_to_image_prompts_and_the_negative_share_one_left_padded_batch(model):
    with _Record().inputs(model.lmm.get_input_embeddings()) as record:  # the rollout's path, CFG on
        encode_conditioning(model, ["a red apple", "two cats", 'a sign that says "OPEN"'], 2, 4.0)
    assert len(record.calls) == 1  # one LLM forward for the positives and the negative
    input_ids = record.calls[0][0][0]
    assert input_ids.shape == (4, 22)
    # Left padding to the 22-token sign prompt: the 13-token negative starts with 9 pads.
    assert input_ids[3, :9].tolist() == [PAD] * 9 and input_ids[3, 9] != PAD
    assert [_unpad(row) for row in input_ids] == [APPLE_IDS, CATS_IDS, SIGN_IDS, NEGATIVE_IDS]


@torch.no_grad()
def test_edit_prompt_and_its_negative_carry_the_same_vision_tokens(model):
    source = _synthetic(64, 64)
    edit = EditConditioning([[source]], [model.encode_reference_images([source])])
    with _Record().inputs(model.lmm.get_input_embeddings()) as embeds, \
            _Record().inputs(model.lmm.model.visual) as tower:
        encode_conditioning(model, ["make it red"], 1, 4.0, edit)
    assert len(tower.calls) == 1 and tower.calls[0][1]["grid_thw"].tolist() == [[1, 4, 4]]  # one tower pass
    # A 64 px source: 56 px into the tower, 4 x 4 patches of 14, merged 2 x 2 -> 4 image tokens in each row.
    expand = [5] * 4
    edit = EDIT_IDS[:4] + expand + EDIT_IDS[5:]
    negative = EDIT_NEGATIVE_IDS[:4] + expand + EDIT_NEGATIVE_IDS[5:]
    assert [_unpad(row) for row in embeds.calls[0][0][0]] == [edit, negative]


# ----------------------------------------------------------------------------- the vision tower's input


def _reference_patches(image: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Independent: bilinear to 7/8 of the size, CLIP normalisation, then patches gathered one by one in
    Qwen2.5-VL's order (merge block row-major, then the patches inside a block row-major; each patch flattened
    as [channel, time, y, x])."""
    height, width = image.shape[-2:]
    scaled = F.interpolate(image[None].double(), size=(height * 7 // 8, width * 7 // 8), mode="bilinear",
                           align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    pixels = (scaled - mean) / std
    rows, cols = pixels.shape[1] // patch, pixels.shape[2] // patch
    out = []
    for block_row in range(rows // merge):
        for block_col in range(cols // merge):
            for i in range(merge):
                for j in range(merge):
                    y, x = (block_row * merge + i) * patch, (block_col * merge + j) * patch
                    tile = pixels[:, y:y + patch, x:x + patch]  # [3, p, p]
                    out.append(torch.stack([tile] * temporal, dim=1).flatten())
    return torch.stack(out)


@torch.no_grad()
@pytest.mark.parametrize("height,width,tokens", [(64, 96, 6), (512, 512, 256), (512, 768, 384)])
def test_vision_tower_receives_the_source_scaled_by_28_32_and_clip_normalised(model, height, width, tokens):
    source = _synthetic(height, width, seed=height + width)
    with _Record().inputs(model.lmm.model.visual) as tower, \
            _Record().inputs(model.lmm.get_input_embeddings()) as embeds:
        model.encode_edit_prompt(["make it red"], [[source]])
    pixel_values, grid = tower.calls[0][0][0], tower.calls[0][1]["grid_thw"]
    assert grid.tolist() == [[1, height * 7 // 8 // 14, width * 7 // 8 // 14]]
    assert int((embeds.calls[0][0][0] == 5).sum()) == tokens
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (tokens * 4, 3 * 2 * 14 * 14)
    if height * width <= 64 * 96:  # the element-by-element comparison on the small image
        # Tolerance (the reference is float64): fp32 bilinear weights come from source coordinates up to 96
        # (ulp 2^-17 = 7.6e-6), so a weight may be off by ~1e-5; times a jump of at most 1 between neighbours,
        # over the smallest CLIP std 0.261: 3e-5. A wrong mean/std (1e-3 -> 4e-3) or resampling is far above.
        torch.testing.assert_close(pixel_values.double(), _reference_patches(source), rtol=0, atol=3e-5)


# ----------------------------------------------------------------------------- embeddings, re-enacted


def _reference_embeddings(model, texts: list[str], images: list[torch.Tensor] | None = None):
    """DeepGen's conditioning re-enacted: left-padded tokens + zero query ids, bool mask, rope positions, the
    vision tower's tokens in the pads (each image as its own tower call, as fusion's multi_apply), the LLM, fused
    layers L-1, L-7, ..., projector_1 -> connector -> (projector_3 sequence, projector_2 of the mean)."""
    lmm, queries = model.lmm, model.meta_queries
    tokens = model.tokenizer(texts, add_special_tokens=True, return_tensors="pt", padding=True,
                             padding_side="left")
    batch, num_queries = tokens.input_ids.shape[0], queries.shape[0]
    input_ids = torch.cat([tokens.input_ids, tokens.input_ids.new_zeros(batch, num_queries)], dim=1)
    mask = torch.cat([tokens.attention_mask.bool(), torch.ones(batch, num_queries, dtype=torch.bool)], dim=1)
    image_id = lmm.config.image_token_id
    features, grids = [], []
    for image in images or []:
        pixels = (F.interpolate((image * 2 - 1)[None], scale_factor=28 / 32, mode="bilinear") + 1) / 2
        pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        patches = _patchify(pixels[0])
        grid = torch.tensor([[1, pixels.shape[-2] // 14, pixels.shape[-1] // 14]])
        features.append(lmm.model.visual(patches, grid_thw=grid).pooler_output)
        grids.append(grid)
    rope_kwargs = {"image_grid_thw": torch.cat(grids)} if grids else {}
    position_ids, _ = lmm.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == image_id).int(),
                                               attention_mask=mask, **rope_kwargs)
    text_ids = input_ids[:, :-num_queries]
    embeds = lmm.get_input_embeddings()(text_ids)
    if features:
        embeds[text_ids == image_id] = torch.cat(features)
    inputs_embeds = torch.cat([embeds, queries[None].expand(batch, -1, -1)], dim=1)
    hidden = lmm.model.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                      output_hidden_states=True).hidden_states
    layers = list(range(len(hidden) - 2, 0, -6))[:model.projector_1.in_features // hidden[0].shape[-1]]
    connected = model.connector(model.projector_1(torch.cat([hidden[i] for i in layers], dim=-1)))
    return model.projector_3(connected), model.projector_2(connected.mean(1))


def _patchify(pixels: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> [H/14 * W/14, 3*2*14*14] in the merge-block order (fusion's rearrange, written as a view)."""
    c, h, w = pixels.shape
    grid = pixels[None].expand(2, c, h, w).reshape(2, c, h // 28, 2, 14, w // 28, 2, 14)
    return grid.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(-1, c * 2 * 14 * 14)


def _chat(user_text: str) -> str:
    return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


def _vision_block(tokens: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * tokens + "<|vision_end|>"


# Tolerance: the same fp32 arithmetic on differently shaped batches (rows of the tower, the LLM and the
# connector), a few ulp of values of order 1 through ~20 layers.
EMBED_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_to_image_negative_is_the_empty_prompt_in_the_positives_batch(model):
    prompts = ["a red apple", 'a sign that says "OPEN"']
    embeds, pooled = _reference_embeddings(model, [_chat(f"Generate an image: {p}") for p in prompts]
                                           + [_chat("Generate an image: ")])
    # The rollout's conditioning (G = 2), the negative expanded to every row.
    cond = encode_conditioning(model, prompts, 2, 4.0)
    torch.testing.assert_close(cond.negative_prompt_embeds, embeds[2:].expand(4, -1, -1), **EMBED_TOLERANCE)
    torch.testing.assert_close(cond.negative_pooled, pooled[2:].expand(4, -1), **EMBED_TOLERANCE)
    torch.testing.assert_close(cond.prompt_embeds, embeds[:2].repeat_interleave(2, 0), **EMBED_TOLERANCE)
    ours = model.encode_prompt_and_negative(prompts)
    for got, want in zip(ours, (embeds[:2], pooled[:2], embeds[2:], pooled[2:])):
        torch.testing.assert_close(got, want, **EMBED_TOLERANCE)


@torch.no_grad()
def test_edit_embeddings_and_negatives_match_the_reference_and_mixed_batches_keep_them(model):
    sources = [_synthetic(64, 64, seed=1), _synthetic(64, 32, seed=2)]
    instructions = ["make it red", "add a hat"]
    counts = [4, 2]  # 56 x 56 -> 2 x 2 merged tokens; 56 x 28 -> 2 x 1
    texts = ([_chat(f"{_vision_block(n)}\n{text}") for n, text in zip(counts, instructions)]
             + [_chat(f"{_vision_block(n)}\n") for n in counts])
    embeds, pooled = _reference_embeddings(model, texts, sources + sources)

    # A mixed rollout batch (text-to-image, edit, text-to-image; G = 2): each kind in its own forward with its
    # own negatives; the edit rows' negatives are that edit's, with its sources.
    prompts = ["a red apple", "make it red", "two cats"]
    latents = model.encode_reference_images(sources[:1])
    edit = EditConditioning([[], [], [sources[0]], [sources[0]], [], []], [[], [], latents, latents, [], []])
    cond = encode_conditioning(model, prompts, 2, 4.0, edit)
    t2i_embeds, _ = _reference_embeddings(model, [_chat("Generate an image: a red apple"),
                                                  _chat("Generate an image: two cats"),
                                                  _chat("Generate an image: ")])
    edit_embeds, _ = _reference_embeddings(model, [_chat(f"{_vision_block(4)}\nmake it red"),
                                                   _chat(f"{_vision_block(4)}\n")], sources[:1] * 2)
    (t2i_rows, t2i), (edit_rows, edit_cond) = cond.parts
    assert t2i_rows.tolist() == [0, 1, 4, 5] and edit_rows.tolist() == [2, 3]
    torch.testing.assert_close(t2i.negative_prompt_embeds, t2i_embeds[2:].expand(4, -1, -1), **EMBED_TOLERANCE)
    torch.testing.assert_close(edit_cond.prompt_embeds, edit_embeds[:1].expand(2, -1, -1), **EMBED_TOLERANCE)
    torch.testing.assert_close(edit_cond.negative_prompt_embeds, edit_embeds[1:].expand(2, -1, -1),
                               **EMBED_TOLERANCE)
    # Two edits of different sources in one batch: each negative with its own sources.
    ours = model.encode_edit_prompt_and_negative(instructions, [[s] for s in sources])
    for got, want in zip(ours, (embeds[:2], pooled[:2], embeds[2:], pooled[2:])):
        torch.testing.assert_close(got, want, **EMBED_TOLERANCE)


# ----------------------------------------------------------------------------- the DiT's timestep


@torch.no_grad()
@pytest.mark.parametrize("edit", [False, True], ids=["text_to_image", "kontext"])
def test_timestep_reaches_time_proj_in_float32_as_sigma_times_1000_in_a_bf16_model(edit):
    model = build_tiny_deepgen(seed=0).to(torch.bfloat16).eval()
    # 0.9931 and 0.9861: bf16 would round their timesteps 993.1 -> 992 and 986.1 -> 988.
    sigmas = torch.tensor([0.9931, 0.9861, 0.5003, 0.0123], dtype=torch.float32)
    latents = torch.randn(4, *model.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    embeds, pooled = model.encode_prompt(["a red apple"] * 4)
    references = None
    if edit:
        references = [model.encode_reference_images([_synthetic(64, 64)])] * 4
    with _Record().inputs(model.transformer.time_text_embed.time_proj) as record:
        velocity = model.predict_velocity(latents, sigmas, embeds, pooled, reference_latents=references)
    (timestep,), _ = record.calls[0]
    assert timestep.dtype == torch.float32
    # sigma (24-bit mantissa) x 1000 (10 bits) is exact in float64; one float32 rounding of it is the fp32 product.
    assert torch.equal(timestep, (sigmas.double() * 1000).float())
    # (These sigmas would catch a bf16 timestep: its first two values differ from the bf16-rounded ones.)
    assert timestep[:2].tolist() != (sigmas[:2] * 1000).bfloat16().float().tolist()
    assert velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
