"""The pairwise prompt UnifiedReward-Think was trained on, and how its reply is read.

The model (UnifiedReward / Pref-GRPO projects) was fine-tuned on one pairwise image template: the caption in
corner brackets 「...」, three core dimensions (semantic consistency, aesthetics, authenticity) plus up to two
extra ones, a 1-10 score per image per dimension with a short rationale, the totals, everything inside
<think>...</think>, then ``<answer>Image 1 is better</answer>`` or ``<answer>Image 2 is better</answer>``.
Asking in that shape keeps the model in distribution (the DeepGen-RL reference sends a one-line question
instead). The wording below is ours; the structure and the answer strings are the model's.
"""

from __future__ import annotations

import re
from typing import Optional

PAIRWISE_THINK_TEMPLATE = """You are a careful and impartial judge of image quality. Below are a text caption and two images that were generated from it. Examine both images closely and decide which one is better.

How to evaluate:

1. The caption of the generated images is: 「{prompt}」. Compare the two images on these core dimensions:
- Semantic consistency (how faithfully the image content follows the caption)
- Aesthetics (composition, use of colour, artistic expression)
- Authenticity (realism and attention to detail)

2. If it helps for this caption or these images, add at most two further dimensions (for example creativity, spatial layout or fine detail). Otherwise keep only the three core dimensions.

3. For every dimension:
- Give Image 1 and Image 2 each a score from 1 to 10
- Justify each score briefly (2 to 5 short sentences)
- Write each dimension as exactly this three-line block, with these line breaks and indentation:
    Dimension name:
        Image 1 (x/10) - rationale;
        Image 2 (y/10) - rationale

4. After the last dimension, add up each image's scores and show the sums in exactly this form:
    Total score:
    Image 1: x+x+x=total
    Image 2: y+y+y=total

5. Put all reasoning and scoring inside <think> and </think>.

6. After </think>, give the verdict inside <answer> and </answer>, containing exactly one of:
- Image 1 is better
- Image 2 is better

Rules:
- Keep the line breaks, indentation and layout of the example below.
- One dimension per three-line block; never merge dimensions on one line.
- No Markdown: no bullet points, bold text or headings.
- Nothing outside <think> and <answer>.
- The <answer> tag holds only the verdict string.

Example of the required layout:

<think>
1. Semantic consistency:
    Image 1 (8/10) - ...;
    Image 2 (6/10) - ...
2. Aesthetics:
    Image 1 (7/10) - ...;
    Image 2 (7/10) - ...
3. Authenticity:
    Image 1 (8/10) - ...;
    Image 2 (6/10) - ...
[Additional dimension if any]:
    Image 1 (6/10) - ...;
    Image 2 (7/10) - ...
Total score:
Image 1: 8+7+8+6=29
Image 2: 6+7+6+7=26
</think>
<answer>Image 1 is better</answer>

The example only shows the layout (line breaks, indentation, symbols). Base your evaluation on the given caption and the two images."""

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_VERDICT = re.compile(r"image\s*([12])\s*is\s*better", re.IGNORECASE)


def render_pairwise_prompt(prompt: str, template: str = PAIRWISE_THINK_TEMPLATE) -> str:
    # str.replace, not str.format: captions may contain braces.
    return template.replace("{prompt}", prompt)


def parse_pairwise_answer(reply: Optional[str]) -> Optional[int]:
    """1 or 2 from the last ``<answer>...</answer>`` of ``reply``; None when absent or ambiguous."""
    if not reply:
        return None
    blocks = _ANSWER_BLOCK.findall(reply)
    if not blocks:
        return None
    verdicts = set(_VERDICT.findall(blocks[-1]))
    if len(verdicts) != 1:
        return None
    return int(verdicts.pop())
