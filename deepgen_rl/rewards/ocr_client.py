"""Client of our OCR server: the ``ocr`` reward (batching, retries and 400 handling: ``http_scorer_client``)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from PIL import Image

from deepgen_rl.rewards.base import RewardScores
from deepgen_rl.rewards.http_scorer_client import HttpScorerClient, ItemResult
from deepgen_rl.rewards.protocol import OcrItem, OcrItemResult, OcrScoreRequest, OcrScoreResponse

OCR_START_HINT = "start it with `bash scripts/reward_ocr.sh`, or point OCR_URL / --ocr_url at it"


class OcrRewardClient(HttpScorerClient):
    """``ocr`` reward: 1 - normalised edit distance between the quoted target text and what OCR reads."""

    name = "ocr"
    score_range = (0.0, 1.0)  # 1 - normalised edit distance
    server_label = "OCR server"
    start_hint = OCR_START_HINT
    response_model = OcrScoreResponse
    needs_targets = True  # the reward step passes each sample's explicit target text (an edit's target_text)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int],
              targets: Optional[Sequence[Optional[str]]] = None) -> RewardScores:
        """``targets``: per sample its target text, or None to score the prompt's double-quoted spans."""
        targets = [None] * len(prompts) if targets is None else list(targets)
        if len(targets) != len(prompts):
            raise ValueError(f"ocr got {len(targets)} target texts for {len(prompts)} prompts")
        return super().score(images, [_Item(p, t) for p, t in zip(prompts, targets)], group_ids)

    def _request(self, ids: list[str], images_b64: list[str], items: list["_Item"]) -> OcrScoreRequest:
        return OcrScoreRequest(items=[
            OcrItem(id=item_id, image=image, prompt=item.prompt,
                    targets=None if item.target is None else [item.target])
            for item_id, image, item in zip(ids, images_b64, items)])

    def _read(self, result: OcrItemResult) -> ItemResult:
        if result.score is not None:
            return ItemResult(result.score, None)
        return ItemResult(None, f"OCR server: {result.error or 'no score and no error returned'}")


class _Item(NamedTuple):
    """A prompt and its explicit target text (None: the prompt's quoted spans), as one request item."""

    prompt: str
    target: Optional[str]
