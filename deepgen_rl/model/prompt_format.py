"""Chat-formatted prompts that fit ``--max_prompt_length`` by cutting only the user's prompt text.

The LLM reads ``<|im_start|>user\\nGenerate an image: {prompt}<|im_end|>\\n<|im_start|>assistant\\n`` and then the meta
queries, as the DeepGen fusion model's ``prepare_text2image_prompts`` formats them; an edit reads
``<|im_start|>user\\n{vision blocks}\\n{instruction}<|im_end|>...`` (its ``prepare_image2image_prompts``).
The classifier-free-guidance negative is the same template with an EMPTY prompt (``chat_text("")``, user text
``Generate an image: ``; for an edit, the vision blocks of the same sources and an empty instruction): the text
DeepGen's SFT put in place of a caption for its unconditional dropout, so the unconditional embedding the weights
know.

The tokenizer's own truncation cuts the END of a chat text: the ``<|im_end|>`` and the assistant header go first,
so a long prompt conditions the model on a sequence it never saw in training. Here the template is always whole
and only the prompt's tail is dropped, to the longest prefix whose formatted text fits; the meta queries are
appended after the text by the model, untouched. Callers count the truncated prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

CHAT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATION_TEMPLATE = "Generate an image: {input}"
# The CFG negative's prompt (text-to-image) and instruction (edit): empty, in the same template as the positives.
NEGATIVE_PROMPT = ""
# Editing: each source image as Qwen2.5-VL's vision block (its pad is expanded to the image's token count by
# model/vision_inputs.py), the blocks back to back, then a newline and the instruction as written (the layout
# DeepGen was trained on: ``f"{image_tokens}\\n{instruction}"``).
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_text(prompt: str) -> str:
    """The LLM input text of a generation prompt."""
    return CHAT_TEMPLATE.format(input=GENERATION_TEMPLATE.format(input=prompt))


def edit_chat_text(instruction: str, num_images: int) -> str:
    """The LLM input text of an edit instruction over ``num_images`` source images (pads not yet expanded)."""
    return CHAT_TEMPLATE.format(input=VISION_PLACEHOLDER * num_images + "\n" + instruction)


def num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True).input_ids)


def template_tokens(tokenizer) -> int:
    """Tokens the template takes with an empty prompt: --max_prompt_length must leave room beyond this."""
    return num_tokens(tokenizer, chat_text(""))


@dataclass
class FormattedPrompts:
    texts: list[str]  # chat-formatted, each at most max_length tokens
    truncated: list[bool]  # whose prompt text was cut


def fit_prompt(tokenizer, prompt: str, max_length: int, render=chat_text) -> str:
    """The longest prefix of ``prompt`` whose chat text has at most ``max_length`` tokens (binary search over the
    prefix length in characters; each candidate is tokenized in its template ``render``, so merges at the cut
    are counted)."""
    low, high = 0, len(prompt)  # invariant: prompt[:low] fits; prompt[:high + 1] does not (or high == len)
    while low < high:
        middle = (low + high + 1) // 2
        if num_tokens(tokenizer, render(prompt[:middle])) <= max_length:
            low = middle
        else:
            high = middle - 1
    return prompt[:low]


def format_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> FormattedPrompts:
    """Chat texts of ``prompts``, each cut (prompt text only) to fit ``max_length`` tokens."""
    texts = [chat_text(p) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True).input_ids] if texts else []
    truncated = [n > max_length for n in lengths]
    for index, too_long in enumerate(truncated):
        if too_long:
            texts[index] = chat_text(fit_prompt(tokenizer, prompts[index], max_length))
    return FormattedPrompts(texts=texts, truncated=truncated)


def format_edit_prompts(tokenizer, instructions: Sequence[str], num_images: Sequence[int],
                        max_length: int) -> FormattedPrompts:
    """Edit chat texts, each instruction cut to fit ``max_length`` text tokens; the vision blocks count as their
    three placeholder tokens here (the image tokens they expand to come on top of --max_prompt_length)."""
    texts, truncated = [], []
    for instruction, count in zip(instructions, num_images):
        text = edit_chat_text(instruction, count)
        too_long = num_tokens(tokenizer, text) > max_length
        if too_long:
            text = edit_chat_text(fit_prompt(tokenizer, instruction, max_length,
                                             render=lambda part, n=count: edit_chat_text(part, n)), count)
        texts.append(text)
        truncated.append(too_long)
    return FormattedPrompts(texts=texts, truncated=truncated)
