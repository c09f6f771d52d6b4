"""The model scorer rewards on the training side: names in the dataset YAML, --<name>_url flags and their
environment defaults, the start-up check naming the launcher (servers themselves: test_scorer_servers.py)."""

from __future__ import annotations

import pytest

from deepgen_rl.config import RewardArguments
from deepgen_rl.data import load_dataset_config
from deepgen_rl.rewards import build_rewards
from deepgen_rl.rewards.http_utils import RewardServerUnavailable
from deepgen_rl.rewards.scorer_clients import SCORER_CLIENTS, ModelScorerClient
from tests.reward_servers import free_port

pytestmark = pytest.mark.timeout(60)

NAMES = ("pickscore", "hpsv2", "image_reward", "aesthetic")


def test_url_flags_default_to_their_env_then_their_port(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(f"{name.upper()}_URL", raising=False)
    monkeypatch.setenv("HPSV2_URL", "http://gpu7:9000")
    args = RewardArguments()
    assert args.hpsv2_url == "http://gpu7:9000"
    assert args.pickscore_url == "http://localhost:18091" and args.aesthetic_url == "http://localhost:18094"
    assert args.image_reward_url == f"http://localhost:{SCORER_CLIENTS['image_reward'].port}"
    with pytest.raises(ValueError, match="--image_reward_url must be an http"):
        RewardArguments(image_reward_url="gpu7:9000")


def test_dataset_yaml_uses_the_names_with_the_weights_syntax(tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\n")
    (tmp_path / "train.yaml").write_text("datasets:\n  - name: general\n    path: p.txt\n    rewards:\n"
                                         + "".join(f"      - {name}: 0.25\n" for name in NAMES))
    config = load_dataset_config(tmp_path / "train.yaml", validate_paths=True)
    assert dict(config.datasets[0].rewards) == {name: 0.25 for name in NAMES}


def test_each_name_builds_a_client_of_its_url_and_the_start_up_check_names_the_launcher():
    port = free_port()
    urls = {f"{name}_url": f"http://127.0.0.1:{port}/{name}" for name in NAMES}
    args = RewardArguments(**urls, reward_timeout=1.0, reward_max_retries=0, reward_health_timeout=0.3,
                           reward_max_concurrency=2, reward_request_batch_size=5)
    rewards = build_rewards(NAMES, args, check_ready=False)
    try:
        for name, reward in rewards.items():
            assert isinstance(reward, ModelScorerClient) and reward.name == name
            assert (reward.url, reward.request_batch_size) == (urls[f"{name}_url"], 5)
            assert reward.score_range == SCORER_CLIENTS[name].score_range
    finally:
        for reward in rewards.values():
            reward.close()
    with pytest.raises(RewardServerUnavailable, match=rf"127.0.0.1:{port}/hpsv2.*scripts/reward_server.sh hpsv2.*HPSV2_URL"):
        build_rewards(["hpsv2"], args)
