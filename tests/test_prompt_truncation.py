"""--max_prompt_length cuts only the user's prompt text: the chat template and the meta queries stay whole, and the
trainer counts truncated prompts in its per-step metrics."""

from __future__ import annotations

import dataclasses

import pytest

from deepgen_rl.model.prompt_format import CHAT_TEMPLATE, chat_text, fit_prompt, format_prompts, num_tokens

OCR_PROMPT = 'A birthday card that reads "Happy Birthday Anna" in gold letters on a wooden table'
HEAD = "<|im_start|>user\nGenerate an image: "
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


class CharTokenizer:
    """One token per character: every length below is countable by hand."""

    class _Out:
        def __init__(self, input_ids):
            self.input_ids = input_ids

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):
            return self._Out([list(t) for t in text])
        return self._Out(list(text))


def test_fit_prompt_hand_worked():
    tokenizer = CharTokenizer()
    template = len(HEAD) + len(TAIL)  # 37 + 34 characters
    assert chat_text("") == HEAD + TAIL and num_tokens(tokenizer, chat_text("")) == template
    assert fit_prompt(tokenizer, "abcdefgh", template + 3) == "abc"
    assert fit_prompt(tokenizer, "abcdefgh", template + 8) == "abcdefgh"
    assert fit_prompt(tokenizer, "abcdefgh", template) == ""
    formatted = format_prompts(tokenizer, ["abcdefgh", "ab", "abcd"], template + 3)
    assert formatted.texts == [HEAD + "abc" + TAIL, HEAD + "ab" + TAIL, HEAD + "abc" + TAIL]
    assert formatted.truncated == [True, False, True]


@pytest.fixture(scope="module")
def short_model(tiny_paths):
    """The tiny model with the issue's --max_prompt_length 24."""
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model import load_deepgen_model
    from deepgen_rl.model.tiny import TINY_MODEL_FLAGS

    args = ModelArguments(sd3_model_name_or_path=str(tiny_paths.sd3_dir),
                          qwen2_5_vl_model_name_or_path=str(tiny_paths.qwen_dir), checkpoint=str(tiny_paths.checkpoint),
                          model_dtype="float32", max_prompt_length=24, **TINY_MODEL_FLAGS)
    return load_deepgen_model(args), args


def test_long_prompt_keeps_the_template_and_the_queries(short_model):
    model, _ = short_model
    tokenizer = model.tokenizer
    assert num_tokens(tokenizer, chat_text(OCR_PROMPT)) > 24  # the tiny tokenizer needs 62
    formatted = model.format_prompts([OCR_PROMPT, "a cat"])
    long_text, short_text = formatted.texts
    assert formatted.truncated == [True, False]
    assert long_text.startswith(HEAD + "A birthday") and long_text.endswith(TAIL)
    kept = long_text[len(HEAD):-len(TAIL)]
    assert OCR_PROMPT.startswith(kept) and len(kept) < len(OCR_PROMPT)
    assert num_tokens(tokenizer, long_text) <= 24 < num_tokens(tokenizer, chat_text(OCR_PROMPT[:len(kept) + 1]))
    assert short_text == CHAT_TEMPLATE.format(input="Generate an image: a cat")
    # The LLM sequence: the longest fitted text, then the meta queries.
    embeds, pooled = model.encode_prompt([OCR_PROMPT, "a cat"])
    assert embeds.shape[:2] == (2, num_tokens(tokenizer, long_text) + model.num_queries)
    assert pooled.shape[0] == 2


def test_max_prompt_length_without_room_for_the_prompt_names_the_flag(short_model, tiny_paths):
    from deepgen_rl.model import load_deepgen_model

    _, args = short_model
    with pytest.raises(ValueError, match=r"--max_prompt_length 13 leaves no room.*takes 13 tokens; use at least 14"):
        load_deepgen_model(dataclasses.replace(args, max_prompt_length=13))


def test_trainer_counts_truncated_prompts(process_group, tiny_paths, tmp_path):
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.config import parse_args
    from tests.trainer_utils import ZERO2, tiny_run_flags

    # 16 tokens: the 13-token template + 3, so the quick-start prompts are cut, each by its own amount.
    flags = tiny_run_flags(tiny_paths, tmp_path, deepspeed=str(ZERO2), max_prompt_length=16, max_steps=1,
                           sftaux_coef=0)
    trainer = grpo_deepgen.build_trainer(*parse_args(flags), "cpu")
    try:
        metrics, batch, _ = trainer.training_step()
    finally:
        trainer.close()
    expected = sum(num_tokens(trainer.model.tokenizer, chat_text(s.prompt)) > 16 for s in batch.samples)
    assert expected > 0
    assert metrics["data/truncated_prompts"] == expected
