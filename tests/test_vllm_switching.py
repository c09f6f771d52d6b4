"""vLLM sleep switching around evaluation (issue 15 item 4) against two stand-in vLLM servers (real processes on
127.0.0.1) that log every /sleep, /wake_up and /is_sleeping call with a wall-clock stamp."""

from __future__ import annotations

import time

import pytest

from deepgen_rl.config import DataArguments, EvalArguments, GRPOConfig, JudgeArguments
from deepgen_rl.eval.switching import VllmSleepSwitch, VllmSwitchError
from deepgen_rl.trainer.eval_hook import build_eval_hook, switched_hook
from tests.reward_servers import fake_server, free_port
from tests.test_eval_runner import SERVED, write_bench

pytestmark = pytest.mark.timeout(120)

LAG_S = 0.3  # a server's state flips this long after /sleep or /wake_up


@pytest.fixture(scope="module")
def servers():
    reward = fake_server("--sleep-lag-seconds", str(LAG_S)).start()
    judge = fake_server("--sleep-lag-seconds", str(LAG_S), "--served-model-name", SERVED).start()
    try:
        yield reward, judge
    finally:
        reward.stop()
        judge.stop()


def calls(reward, judge, include_polls: bool = False, since: int = 0) -> list[tuple[str, str, int, object]]:
    """Both servers' sleep-mode calls merged in time order: (server, path, ns, /is_sleeping's answer or None),
    from wall-clock ns ``since``."""
    merged = [("reward", *entry) for entry in reward.stats()["sleep_log"]]
    merged += [("judge", *entry) for entry in judge.stats()["sleep_log"]]
    return sorted((tuple(c) for c in merged if (include_polls or c[1] != "/is_sleeping") and c[2] >= since),
                  key=lambda c: c[2])


def test_switch_order_and_each_transition_is_waited_for(servers):
    reward, judge = servers
    switch = VllmSleepSwitch([reward.url], judge.url, timeout_s=20.0, poll_s=0.05)
    switch.to_judge()  # a known state: reward asleep, judge awake
    since = time.time_ns()
    switch.to_reward()
    switch.to_judge()
    switch.to_reward()
    log = calls(reward, judge, since=since)
    assert [(server, path) for server, path, _, _ in log] == [("judge", "/sleep?level=1"), ("reward", "/wake_up")] + [
        ("reward", "/sleep?level=1"), ("judge", "/wake_up"), ("judge", "/sleep?level=1"), ("reward", "/wake_up")]
    # Between one transition and the next call, the switched server was polled until /is_sleeping reported the new
    # state (its state flips LAG_S after the call, so the first polls answer the old one).
    full = calls(reward, judge, include_polls=True, since=since)
    starts = [i for i, c in enumerate(full) if c[1] != "/is_sleeping"]
    for start, end in zip(starts, starts[1:] + [len(full)]):
        server, path = full[start][:2]
        polls = [c[3] for c in full[start + 1:end] if c[0] == server]
        assert polls and polls[-1] == path.startswith("/sleep") and polls.count(polls[-1]) == 1, (path, polls)


def test_a_server_that_does_not_switch_fails_naming_its_url():
    with fake_server("--sleep-mode", "stuck") as stuck, fake_server("--sleep-mode", "off") as off:
        with pytest.raises(VllmSwitchError, match="did not go to sleep within --vllm_switch_timeout 1 s") as info:
            VllmSleepSwitch([stuck.url], off.url, timeout_s=1.0, poll_s=0.05).to_judge()
        assert stuck.url in str(info.value) and "is_sleeping=False" in str(info.value)
        with pytest.raises(VllmSwitchError, match="HTTP 404") as info:
            VllmSleepSwitch([], off.url, timeout_s=1.0, poll_s=0.05).to_judge()  # no dev mode: no endpoints
        assert off.url in str(info.value) and "VLLM_SERVER_DEV_MODE=1" in str(info.value)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(VllmSwitchError, match="did not answer POST /sleep") as info:
        VllmSleepSwitch([down], down, timeout_s=1.0, poll_s=0.05).to_reward()
    assert down in str(info.value)


def test_hook_runs_with_the_judge_awake_and_switches_back_after_a_failure(servers):
    reward, judge = servers
    switch = VllmSleepSwitch([reward.url], judge.url, timeout_s=20.0, poll_s=0.05)
    seen = []
    since = time.time_ns()

    def evaluation(model, step):
        seen.append(len(calls(reward, judge, since=since)))  # switched to the judge before the evaluation starts
        if step == 2:
            raise RuntimeError("generation failed")
        return {"eval/x": 1.0}

    hook = switched_hook(evaluation, switch)
    assert hook(None, 1) == {"eval/x": 1.0}
    with pytest.raises(RuntimeError, match="generation failed"):
        hook(None, 2)
    assert seen == [2, 6]  # reward /sleep + judge /wake_up before each evaluation
    assert [c[:2] for c in calls(reward, judge, since=since)] == 2 * [
        ("reward", "/sleep?level=1"), ("judge", "/wake_up"), ("judge", "/sleep?level=1"), ("reward", "/wake_up")]


def test_trainer_hook_switches_only_with_the_flag(servers, tmp_path):
    reward, judge = servers
    data = DataArguments(eval_dataset_config=str(write_bench(tmp_path / "bench")))
    judge_args = JudgeArguments(unigenbench_api_url=judge.url, judge_health_timeout=5.0)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to="none", eval_freq=5)
    since = time.time_ns()
    assert build_eval_hook(args, data, judge_args, EvalArguments(), [reward.url]) is not None
    assert calls(reward, judge, since=since) == []  # without --vllm_sleep_switching nothing is switched
    flagged = EvalArguments(vllm_sleep_switching=True, vllm_switch_timeout=20.0)
    assert build_eval_hook(args, data, judge_args, flagged, [reward.url]) is not None
    # At start-up the judge goes to sleep (training time) and the reward server is woken.
    assert [c[:2] for c in calls(reward, judge, since=since)] == [("judge", "/sleep?level=1"), ("reward", "/wake_up")]
    with pytest.raises(ValueError, match="--vllm_switch_timeout"):
        EvalArguments(vllm_switch_timeout=0)
