"""Client of our OCR server: the ``ocr`` reward (batching, retries and 400 handling: ``http_scorer_client``)."""

from __future__ import annotations

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

    def _request(self, images_b64: list[str], prompts: list[str]) -> OcrScoreRequest:
        return OcrScoreRequest(items=[OcrItem(image=image, prompt=prompt) for image, prompt in zip(images_b64, prompts)])

    def _read(self, result: OcrItemResult) -> ItemResult:
        if result.score is not None:
            return ItemResult(result.score, None)
        return ItemResult(None, f"OCR server: {result.error or 'no score and no error returned'}")
