"""Reward names (as written in the dataset YAML) -> the function that builds the reward.

    ocr                   OCR server (ours)                      ocr_client.OcrRewardClient
    unifiedreward_think   UnifiedReward-Think on vLLM, pairwise  unifiedreward.UnifiedRewardThinkClient
    clip_sim              CLIP cosine similarity, in-process     clip_sim.ClipSimilarityReward
    jpeg_compressibility  JPEG compressibility, in-process       jpeg.JpegCompressibilityReward

Everything a reward needs comes in one ``RewardSettings`` built from the parsed flags (``from_args``); nothing
here reads the environment. Heavy modules are imported only when their reward is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from deepgen_rl.rewards.base import RewardFunction
from deepgen_rl.rewards.http_utils import RetryPolicy


@dataclass(frozen=True)
class RewardSettings:
    """Server URLs, timeouts and model paths for building rewards (see DataArguments / ModelArguments)."""

    ocr_url: str
    unifiedreward_url: str
    unifiedreward_model_name: str
    unifiedreward_max_tokens: int
    timeout_s: float
    max_retries: int
    backoff_s: float
    health_timeout_s: float
    max_concurrency: int
    request_batch_size: int
    clip_model_path: str
    device: str = "cpu"

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_s=self.backoff_s)

    @classmethod
    def from_args(cls, data_args, model_args, device: str = "cpu") -> "RewardSettings":
        """From ``DataArguments`` and ``ModelArguments`` (deepgen_rl.config); ``device`` runs in-process models."""
        return cls(
            ocr_url=data_args.ocr_url,
            unifiedreward_url=data_args.unifiedreward_think_url,
            unifiedreward_model_name=data_args.unifiedreward_model_name,
            unifiedreward_max_tokens=data_args.unifiedreward_max_tokens,
            timeout_s=data_args.reward_timeout,
            max_retries=data_args.reward_max_retries,
            backoff_s=data_args.reward_retry_backoff,
            health_timeout_s=data_args.reward_health_timeout,
            max_concurrency=data_args.reward_max_concurrency,
            request_batch_size=data_args.reward_request_batch_size,
            clip_model_path=model_args.clip_model_name_or_path,
            device=str(device),
        )


def _build_ocr(settings: RewardSettings) -> RewardFunction:
    from deepgen_rl.rewards.ocr_client import OcrRewardClient

    return OcrRewardClient(settings.ocr_url, settings.retry_policy, settings.max_concurrency,
                           settings.request_batch_size, settings.health_timeout_s)


def _build_unifiedreward_think(settings: RewardSettings) -> RewardFunction:
    from deepgen_rl.rewards.unifiedreward import UnifiedRewardThinkClient

    return UnifiedRewardThinkClient(settings.unifiedreward_url, settings.unifiedreward_model_name,
                                    settings.retry_policy, settings.max_concurrency,
                                    settings.unifiedreward_max_tokens, settings.health_timeout_s)


def _build_clip_sim(settings: RewardSettings) -> RewardFunction:
    from deepgen_rl.rewards.clip_sim import ClipSimilarityReward

    return ClipSimilarityReward(settings.clip_model_path, device=settings.device)


def _build_jpeg(settings: RewardSettings) -> RewardFunction:
    from deepgen_rl.rewards.jpeg import JpegCompressibilityReward

    del settings
    return JpegCompressibilityReward()


REWARD_BUILDERS: dict[str, Callable[[RewardSettings], RewardFunction]] = {
    "ocr": _build_ocr,
    "unifiedreward_think": _build_unifiedreward_think,
    "clip_sim": _build_clip_sim,
    "jpeg_compressibility": _build_jpeg,
}
REWARD_NAMES: tuple[str, ...] = tuple(REWARD_BUILDERS)


def build_rewards(names: Iterable[str], settings: RewardSettings, check_ready: bool = True,
                  builders: Optional[dict[str, Callable[[RewardSettings], RewardFunction]]] = None
                  ) -> dict[str, RewardFunction]:
    """Build each named reward (and, by default, check its server is up: fail at start-up, not mid-run)."""
    table = builders if builders is not None else REWARD_BUILDERS
    rewards: dict[str, RewardFunction] = {}
    try:
        for name in dict.fromkeys(names):
            if name not in table:
                raise ValueError(f"unknown reward {name!r}; available rewards: {', '.join(table)}.")
            rewards[name] = table[name](settings)
            if check_ready:
                rewards[name].check_ready()
    except BaseException:
        for reward in rewards.values():
            reward.close()
        raise
    return rewards
