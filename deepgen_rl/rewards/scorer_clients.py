"""Clients of our model scorer servers: the ``pickscore``, ``hpsv2``, ``image_reward`` and ``aesthetic`` rewards.

Each is served by ``bash scripts/reward_server.sh NAME`` (``deepgen_rl.rewards.servers.serve``) on its own port,
and reached at ``--<name>_url`` / ``$<NAME>_URL`` (``config.ScorerUrlArguments``). Batching, retries and the
handling of a 400 that names bad items are the OCR client's (``http_scorer_client``).

``score_range``: every valid score lies in it; a value outside (a broken server's 1e30) fails the sample. For
PickScore (exp(logit_scale) <= 100 times a cosine) and HPSv2 (a cosine) these are the exact bounds; the two MLP
heads are unbounded linear maps, so theirs are far wider than any score they give in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepgen_rl.rewards.http_scorer_client import HttpScorerClient, ItemResult
from deepgen_rl.rewards.http_utils import RetryPolicy
from deepgen_rl.rewards.protocol import ScoreItem, ScoreItemResult, ScoreRequest, ScoreResponse


@dataclass(frozen=True)
class ScorerClientSpec:
    name: str
    port: int
    score_range: tuple[float, float]
    what: str  # for help strings and messages

    @property
    def env(self) -> str:
        return f"{self.name.upper()}_URL"


SCORER_CLIENTS = {spec.name: spec for spec in (
    ScorerClientSpec("pickscore", 18091, (-100.0, 100.0), "PickScore server"),
    ScorerClientSpec("hpsv2", 18092, (-1.0, 1.0), "HPSv2.1 server"),
    ScorerClientSpec("image_reward", 18093, (-100.0, 100.0), "ImageReward server"),
    ScorerClientSpec("aesthetic", 18094, (-100.0, 100.0), "LAION aesthetic predictor server"),
)}


class ModelScorerClient(HttpScorerClient):
    """One model scorer reward; ``spec`` says which."""

    response_model = ScoreResponse

    def __init__(self, spec: ScorerClientSpec, url: str, policy: RetryPolicy, max_concurrency: int,
                 request_batch_size: int, health_timeout_s: float) -> None:
        self.name = spec.name
        self.score_range = spec.score_range
        self.server_label = spec.what
        self.start_hint = (f"start it with `bash scripts/reward_server.sh {spec.name}`, or point {spec.env} / "
                           f"--{spec.name}_url at it")
        super().__init__(url, policy, max_concurrency, request_batch_size, health_timeout_s)

    def _request(self, ids: list[str], images_b64: list[str], prompts: list[str]) -> ScoreRequest:
        return ScoreRequest(items=[ScoreItem(id=item_id, image=image, prompt=prompt)
                                   for item_id, image, prompt in zip(ids, images_b64, prompts)])

    def _read(self, result: ScoreItemResult) -> ItemResult:
        if result.score is not None:
            return ItemResult(result.score, None)
        return ItemResult(None, f"{self.server_label}: {result.error or 'no score and no error returned'}")
