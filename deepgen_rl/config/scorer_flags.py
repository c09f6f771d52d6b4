"""The ``--<name>_url`` flags of the model scorer rewards (a mixin of ``config.RewardArguments``).

Each defaults to ``$<NAME>_URL``, else ``http://localhost:<its port>`` (ports: ``scorer_clients.SCORER_CLIENTS``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from deepgen_rl.rewards.scorer_clients import SCORER_CLIENTS


def _url_field(name: str):
    spec = SCORER_CLIENTS[name]
    default = f"http://localhost:{spec.port}"
    return field(default_factory=lambda: os.environ.get(spec.env, default),
                 metadata={"help": f"{spec.what} (`bash scripts/reward_server.sh {name}`), for the {name} reward. "
                                   f"Default: ${spec.env}, else {default}."})


@dataclass
class ScorerUrlArguments:
    pickscore_url: str = _url_field("pickscore")
    hpsv2_url: str = _url_field("hpsv2")
    image_reward_url: str = _url_field("image_reward")
    aesthetic_url: str = _url_field("aesthetic")


SCORER_URL_FLAGS = tuple(f"{name}_url" for name in SCORER_CLIENTS)
