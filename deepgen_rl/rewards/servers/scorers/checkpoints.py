"""Reading a published checkpoint file and loading a key-mapped state dict with nothing silently left out."""

from __future__ import annotations

from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]


def require_path(path: str, what: str, setting: str, kind: str = "file") -> Path:
    """``path`` as a Path, or ValueError naming the flag / variable that should point at it."""
    if not path:
        raise ValueError(f"{what}: no path given; set {setting}.")
    resolved = Path(path).expanduser()
    if not (resolved.is_file() if kind == "file" else resolved.is_dir()):
        raise ValueError(f"{what}: {setting} = {path!r} is not a {kind} on this machine.")
    return resolved


def read_state_dict(path: str, what: str, setting: str) -> StateDict:
    """Tensors of a ``.pt``/``.pth``/``.bin`` (torch.save, weights only) or ``.safetensors`` file.

    A dict wrapping them under ``state_dict`` or ``model`` (as training scripts save) is unwrapped, and a
    ``module.`` prefix (DataParallel / DDP) is stripped.
    """
    file = require_path(path, what, setting)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{what}: cannot read {setting} = {path!r} as a torch checkpoint "
                             f"({type(err).__name__}: {err}).") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {setting} = {path!r} holds no state dict of tensors.")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_exactly(module: torch.nn.Module, mapped: StateDict, source: str) -> None:
    """Load ``mapped`` into ``module``; every parameter and persistent buffer must come from it, nothing extra."""
    missing, unexpected = module.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model: missing {_few(missing)}; unexpected {_few(unexpected)} "
                         "(is it the right checkpoint for this scorer?).")


def _few(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def count_blocks(state: StateDict, prefix: str) -> int:
    """Number of blocks ``{prefix}{i}.`` (i = 0, 1, ...) in ``state``."""
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state if key.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"blocks {prefix}* are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)
