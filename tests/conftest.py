"""Shared fixtures: tiny DeepGen parts written once per test session in the real on-disk layouts."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real DeepGen files (read-only) live beside the repository in shared/reference-data on the team's machines;
# a user's own clone does not have them, and tests that need them skip with this reason.
REFERENCE_DATA = REPO_ROOT.parent / "shared" / "reference-data"
REFERENCE_DATA_MISSING = f"reference data folder {REFERENCE_DATA} is absent (only on the team's machines)"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from deepgen_rl.model.tiny import save_tiny_deepgen

    return save_tiny_deepgen(tmp_path_factory.mktemp("tiny_deepgen"), seed=0)


@pytest.fixture()
def tiny_model_args(tiny_paths):
    """ModelArguments pointing at the tiny parts, as a user's exports + flags would."""
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model.tiny import TINY_MODEL_FLAGS

    return ModelArguments(
        sd3_model_name_or_path=str(tiny_paths.sd3_dir),
        qwen2_5_vl_model_name_or_path=str(tiny_paths.qwen_dir),
        checkpoint=str(tiny_paths.checkpoint),
        model_dtype="float32",
        **TINY_MODEL_FLAGS,
    )


@pytest.fixture(scope="session")
def published_config_paths(tmp_path_factory):
    """(sd3_dir, qwen_dir) holding the published Qwen2.5-VL-3B / SD3.5-Medium configs (no weights)."""
    from deepgen_rl.model.published_configs import write_published_configs

    return write_published_configs(tmp_path_factory.mktemp("published_configs"))


@pytest.fixture(scope="session")
def real_size_model(published_config_paths):
    """(ModelArguments, the joint model at real size on the meta device): built once, shared (tests that change
    requires_grad restore it; loading into meta parameters changes nothing)."""
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model.meta import build_deepgen_model_on_meta

    sd3, qwen = published_config_paths
    model_args = ModelArguments(sd3_model_name_or_path=str(sd3), qwen2_5_vl_model_name_or_path=str(qwen),
                                checkpoint="", model_dtype="bfloat16")
    return model_args, build_deepgen_model_on_meta(model_args)


@contextmanager
def _environment(values: dict):
    """Set ``values`` in os.environ, restoring the previous values (or their absence) afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def _one_process_group():
    """One one-process gloo group (DeepSpeed's ``init_distributed``) for the whole session, torn down once, through
    DeepSpeed, at the end. Shared on purpose: a group destroyed with ``torch.distributed.destroy_process_group``
    leaves DeepSpeed's cached groups pointing at it, and the next in-process engine fails ("Group ... is not
    registered"). Yields the rank environment it was made with."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    from tests.trainer_utils import free_port

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    created = not dist.is_initialized()
    if created:
        with _environment(env):
            deepspeed.init_distributed(dist_backend="gloo")
    assert dist.get_world_size() == 1
    yield env
    if created:
        deepspeed.comm.destroy_process_group()


@pytest.fixture(scope="module")
def process_group(_one_process_group):
    """The session's one-process group, with its rank environment set for the module (as the entry point sees it
    outside torchrun) and removed afterwards, so later tests' subprocesses (train.sh, torchrun) do not inherit it."""
    with _environment(_one_process_group):
        yield
