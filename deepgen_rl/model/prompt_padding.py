"""The padded length of a text-to-image prompt batch, fixed for a whole GRPO step (world-size invariance).

The LLM encodes a batch of chat texts left-padded to the batch's longest one, and the DiT attends to every one of
the P + Q conditioning positions, pad positions included (SD3 has no text mask). A prompt's conditioning therefore
depends on the padded length, i.e. on the OTHER prompts of its batch: the same prompt on rank 0 of 2 and on a
single rank (which encodes the whole global batch) would be conditioned differently. The trainer makes the padded
length a property of the step: every rank pads its batch to at least the longest chat text of the step's GLOBAL
prompt list (an all-reduce max of the ranks' longest), which is exactly what one rank encoding the whole batch
pads to. ``padded_to_at_least`` scopes that floor to the step's rollout and training encodes; everything else
(evaluation, SFT-aux captions) pads as before. Edit prompts (vision inputs) keep their batch's own length.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

from .prompt_format import NEGATIVE_PROMPT, chat_text

_FLOOR: ContextVar[int] = ContextVar("deepgen_rl_prompt_pad_floor", default=0)


def pad_floor() -> int:
    """The least padded length (tokens) of a text-to-image batch here (0: the batch's own longest)."""
    return _FLOOR.get()


@contextmanager
def padded_to_at_least(length: int) -> Iterator[None]:
    """Text-to-image prompt batches encoded inside pad to at least ``length`` tokens (0: no floor)."""
    token = _FLOOR.set(int(length))
    try:
        yield
    finally:
        _FLOOR.reset(token)


def longest_chat_text(model, prompts: Sequence[str], with_negative: bool) -> int:
    """Tokens of the longest chat text ``model`` would encode for ``prompts`` (and the CFG negative)."""
    texts = list(model.format_prompts(list(prompts)).texts) + ([chat_text(NEGATIVE_PROMPT)] if with_negative else [])
    ids = model.tokenizer(texts, add_special_tokens=True)["input_ids"]
    return max(len(row) for row in ids)
