"""Reward names (as written in the dataset YAML) -> the function that builds the reward.

    ocr                   OCR server (ours)                      ocr_client.OcrRewardClient
    unifiedreward_think   UnifiedReward-Think on vLLM, pairwise  unifiedreward.UnifiedRewardThinkClient
    clip_sim              CLIP cosine similarity, in-process     clip_sim.ClipSimilarityReward
    jpeg_compressibility  JPEG compressibility, in-process       jpeg.JpegCompressibilityReward
    pickscore, hpsv2,     our model scorer servers (one each)    scorer_clients.ModelScorerClient
    image_reward, aesthetic
    edit_vlm_judge        edit judge VLM on vLLM, per sample     edit_judge.EditJudgeClient          (edit datasets)
    image_similarity      CLIP source-result cosine, in-process  image_similarity.ImageSimilarityReward (edit datasets)
    vlm_judge, vlm_judge_<name>   a pointwise VLM judge on vLLM  vlm_judge.VlmJudgeReward  (the named ones come from
                          --vlm_judge_config: ``known_reward_names(args)`` lists them for the dataset YAML check)
    synthetic_match       synthetic scene match, in-process      synthetic.SyntheticMatchReward
    redness, brightness   built to be hacked (monitor tests)     hackable.RednessReward / BrightnessReward

Everything a reward needs comes from the parsed flags (``RewardArguments``, plus the CLIP folder and the device of
in-process models); nothing here reads the environment. Heavy modules are imported only when their reward is built.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from deepgen_rl.rewards.base import RewardFunction
from deepgen_rl.rewards.http_utils import RetryPolicy
from deepgen_rl.rewards.names import EDIT_ONLY_REWARDS, REWARD_NAMES

# The parsed reward flags (config.RewardArguments), read by attribute and never imported: config sits above the
# rewards (docs/architecture.md), and importing it would pull transformers into the OCR server.
RewardArguments = Any


def _policy(args: RewardArguments) -> RetryPolicy:
    return RetryPolicy(args.reward_timeout, args.reward_max_retries, args.reward_retry_backoff)


# A builder gets (the reward flags, --clip_model_name_or_path, the device of in-process models).
Builder = Callable[["RewardArguments", str, str], RewardFunction]


def _build_ocr(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.ocr_client import OcrRewardClient

    return OcrRewardClient(args.ocr_url, _policy(args), args.reward_max_concurrency,
                           args.reward_request_batch_size, args.reward_health_timeout)


def _build_unifiedreward_think(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.unifiedreward import UnifiedRewardThinkClient

    return UnifiedRewardThinkClient(args.unifiedreward_think_url, args.unifiedreward_model_name, _policy(args),
                                    args.reward_max_concurrency, args.unifiedreward_max_tokens,
                                    args.reward_health_timeout, pair_order=args.unifiedreward_pair_order,
                                    order_seed=args.unifiedreward_order_seed)


def _build_clip_sim(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.clip_sim import ClipSimilarityReward

    return ClipSimilarityReward(clip_model_path, device=device)


def _build_jpeg(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.jpeg import JpegCompressibilityReward

    return JpegCompressibilityReward()


def _scorer_builder(name: str) -> Builder:
    def build(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
        from deepgen_rl.rewards.scorer_clients import SCORER_CLIENTS, ModelScorerClient

        return ModelScorerClient(SCORER_CLIENTS[name], getattr(args, f"{name}_url"), _policy(args),
                                 args.reward_max_concurrency, args.reward_request_batch_size,
                                 args.reward_health_timeout)

    return build


def _build_edit_judge(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.edit_judge import EditJudgeClient

    return EditJudgeClient(args.edit_judge_url, args.edit_judge_model_name, _policy(args), args.reward_max_concurrency,
                           args.edit_judge_max_tokens, args.reward_health_timeout)


def _build_image_similarity(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.image_similarity import ImageSimilarityReward

    return ImageSimilarityReward(clip_model_path, device=device)


def _build_vlm_judge(args: RewardArguments, clip_model_path: str, device: str, name: str = "vlm_judge"
                     ) -> RewardFunction:
    from deepgen_rl.rewards.vlm_judge import VlmJudgeReward, load_judge_specs

    return VlmJudgeReward(load_judge_specs(args)[name], _policy(args), args.reward_max_concurrency,
                          args.reward_health_timeout)


def _build_synthetic_match(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.synthetic import SyntheticMatchReward

    return SyntheticMatchReward()


def _build_redness(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.hackable import RednessReward

    return RednessReward()


def _build_brightness(args: RewardArguments, clip_model_path: str, device: str) -> RewardFunction:
    from deepgen_rl.rewards.hackable import BrightnessReward

    return BrightnessReward()


REWARD_BUILDERS: dict[str, Builder] = {
    "ocr": _build_ocr,
    "unifiedreward_think": _build_unifiedreward_think,
    "clip_sim": _build_clip_sim,
    "jpeg_compressibility": _build_jpeg,
    **{name: _scorer_builder(name) for name in ("pickscore", "hpsv2", "image_reward", "aesthetic")},
    "edit_vlm_judge": _build_edit_judge,
    "image_similarity": _build_image_similarity,
    "vlm_judge": _build_vlm_judge,
    "synthetic_match": _build_synthetic_match,
    "redness": _build_redness,
    "brightness": _build_brightness,
}


def _named_judge_builders(args: RewardArguments) -> dict[str, Builder]:
    """A builder per judge of --vlm_judge_config (none without it)."""
    if not args.vlm_judge_config:
        return {}
    from deepgen_rl.rewards.vlm_judge import VLM_JUDGE, load_judge_specs

    return {name: (lambda a, c, d, name=name: _build_vlm_judge(a, c, d, name))
            for name in load_judge_specs(args) if name != VLM_JUDGE}


def known_reward_names(args: RewardArguments) -> tuple[str, ...]:
    """Every reward name this run can build: the table's and the judges of --vlm_judge_config."""
    return REWARD_NAMES + tuple(_named_judge_builders(args))


def vllm_reward_urls(rewards: dict[str, RewardFunction]) -> list[str]:
    """The vLLM servers behind ``rewards`` (every reward with a ``vllm_url``: UnifiedReward-Think, the VLM and
    edit judges), once each: what --vllm_sleep_switching puts to sleep around evaluation."""
    return list(dict.fromkeys(url for reward in rewards.values() if (url := getattr(reward, "vllm_url", None))))


def build_rewards(names: Iterable[str], args: RewardArguments, clip_model_path: str = "", device: str = "cpu",
                  check_ready: bool = True, builders: Optional[dict[str, Builder]] = None) -> dict[str, RewardFunction]:
    """Build each named reward (and, by default, check its server is up: fail at start-up, not mid-run)."""
    table = builders if builders is not None else {**REWARD_BUILDERS, **_named_judge_builders(args)}
    rewards: dict[str, RewardFunction] = {}
    try:
        for name in dict.fromkeys(names):
            if name not in table:
                raise ValueError(f"unknown reward {name!r}; available rewards: {', '.join(table)}.")
            rewards[name] = table[name](args, clip_model_path, str(device))
            if check_ready:
                rewards[name].check_ready()
    except BaseException:
        for reward in rewards.values():
            reward.close()
        raise
    return rewards
