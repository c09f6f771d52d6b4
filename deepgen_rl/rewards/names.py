"""Reward names and choices shared with the flags (``config``) and the dataset YAML (``data``).

Imports nothing of ours, so the layers above the rewards (data, config) read them without the reward code, and
the rewards never import the flag dataclasses. ``registry.REWARD_BUILDERS`` has one builder per name of
``REWARD_NAMES`` (tests/test_layers.py checks they agree).
"""

from __future__ import annotations

from typing import Literal, get_args

# The names a dataset YAML may list under ``rewards`` (plus vlm_judge_<name> of --vlm_judge_config).
REWARD_NAMES: tuple[str, ...] = ("ocr", "unifiedreward_think", "clip_sim", "jpeg_compressibility", "pickscore",
                                 "hpsv2", "image_reward", "aesthetic", "edit_vlm_judge", "image_similarity",
                                 "vlm_judge", "synthetic_match", "redness", "brightness")
# Rewards that compare the result with the sample's source images: only edit datasets (JSONL) can use them.
EDIT_ONLY_REWARDS: tuple[str, ...] = ("edit_vlm_judge", "image_similarity")

# --unifiedreward_pair_order and --vlm_judge_answer (config.judge_flags) take one of these.
PairOrder = Literal["random", "both", "fixed"]
VlmAnswerFormat = Literal["score", "yes_no"]
PAIR_ORDERS: tuple[str, ...] = get_args(PairOrder)
VLM_ANSWER_FORMATS: tuple[str, ...] = get_args(VlmAnswerFormat)

# The OCR server's port: its own default (rewards/servers/ocr.py) and --ocr_url's (config.server_flags).
DEFAULT_OCR_PORT = 18082
