"""vLLM sleep switching (``--vllm_sleep_switching``): a reward model and the UniGenBench judge sharing GPUs.

During training the reward servers are awake and the judge sleeps; around each evaluation :class:`VllmSleepSwitch`
puts the reward servers to sleep and wakes the judge (``to_judge``), then the reverse (``to_reward``). Sleep comes
first so that the memory is free before the other model loads. Each transition is checked: after ``POST /sleep``
or ``POST /wake_up`` the server's ``GET /is_sleeping`` must report the new state before ``timeout_s``, else
:class:`VllmSwitchError` names the server's URL (the endpoints exist only in vLLM's dev mode with
``--enable-sleep-mode``, which our launchers set, on 127.0.0.1 unless VLLM_HOST says otherwise).
"""

from __future__ import annotations

import time
from typing import Sequence

import httpx

from deepgen_rl.rewards.http_utils import MAX_CONNECT_TIMEOUT_S, join_url
from deepgen_rl.rewards.protocol import (VLLM_IS_SLEEPING_PATH, VLLM_SLEEP_PATH, VLLM_WAKE_UP_PATH,
                                         IsSleepingResponse)

SLEEP_LEVEL = 1  # weights to host memory, KV cache dropped: a wake-up reloads from RAM, not from disk
FIX_HINT = ("start it with our launcher (scripts/reward_unifiedreward.sh or scripts/eval_unigenbench_evalmodel.sh: "
            "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1) where this trainer can reach it, raise "
            "--vllm_switch_timeout, or train without --vllm_sleep_switching")


class VllmSwitchError(RuntimeError):
    """A vLLM server did not go to sleep / wake up in time; the message names its URL."""


class VllmSleepSwitch:
    """Switch the GPU between the vLLM reward servers (``reward_urls``) and the judge (``judge_url``)."""

    def __init__(self, reward_urls: Sequence[str], judge_url: str, timeout_s: float, poll_s: float = 0.5) -> None:
        self.reward_urls, self.judge_url = list(reward_urls), judge_url
        self.timeout_s, self.poll_s = timeout_s, poll_s

    def to_judge(self) -> None:
        """Reward servers asleep, then the judge awake."""
        for url in self.reward_urls:
            self.set_sleeping(url, True)
        self.set_sleeping(self.judge_url, False)

    def to_reward(self) -> None:
        """The judge asleep, then the reward servers awake."""
        self.set_sleeping(self.judge_url, True)
        for url in self.reward_urls:
            self.set_sleeping(url, False)

    def set_sleeping(self, url: str, asleep: bool) -> None:
        """POST /sleep (or /wake_up) and wait until /is_sleeping reports it, within ``timeout_s``."""
        what = "go to sleep" if asleep else "wake up"
        path = f"{VLLM_SLEEP_PATH}?level={SLEEP_LEVEL}" if asleep else VLLM_WAKE_UP_PATH
        deadline = time.monotonic() + self.timeout_s
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, MAX_CONNECT_TIMEOUT_S))
        with httpx.Client(timeout=timeout) as client:
            try:
                response = client.post(join_url(url, path))
            except httpx.HTTPError as err:
                raise VllmSwitchError(f"vLLM server at {url} did not answer POST {path} ({type(err).__name__}: "
                                      f"{err}): {FIX_HINT}.") from None
            if response.status_code != 200:
                raise VllmSwitchError(f"vLLM server at {url} answered POST {path} with HTTP {response.status_code} "
                                      f"(no sleep mode?): {FIX_HINT}.")
            last = "no answer"
            while True:
                try:
                    state = IsSleepingResponse.model_validate_json(client.get(join_url(url, VLLM_IS_SLEEPING_PATH),
                                                                              timeout=self.poll_s + 5.0).content)
                    if state.is_sleeping == asleep:
                        return
                    last = f"is_sleeping={state.is_sleeping}"
                except (httpx.HTTPError, ValueError) as err:
                    last = f"GET {VLLM_IS_SLEEPING_PATH} failed: {type(err).__name__}"
                if time.monotonic() + self.poll_s > deadline:
                    raise VllmSwitchError(f"vLLM server at {url} did not {what} within --vllm_switch_timeout "
                                          f"{self.timeout_s:g} s (last: {last}): {FIX_HINT}.")
                time.sleep(self.poll_s)
