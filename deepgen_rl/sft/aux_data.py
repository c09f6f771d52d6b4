"""SFT-aux image-caption data from an mmengine python config (format: sft/configs/datasets/deepgen/
t2i_grpo_moretextdata.py).

The config defines ``sftaux_datasets``: a list of dicts, each an ``image_caption_jsonl`` or ``image_folder``
dataset (see the shipped config for the fields). :class:`SftAuxSampler` draws seeded, resumable batches: batch b
item i (its global index in the step's --sftaux_global_batch_size items; each rank draws its slice,
core/sftaux_batch.py) uses a generator seeded by (seed, b, i), so its only state is the number of batches drawn
and any world size draws the same items.
Images are resized (shorter side) and centre-cropped to the training resolution, as floats in [0, 1].

Legend: n images per batch, H/W the training image size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from deepgen_rl.core.distributed import numpy_rng

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DATASET_TYPES = ("image_caption_jsonl", "image_folder")


class SftAuxDataConfigError(ValueError):
    """The SFT-aux config is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class SftAuxDataset:
    name: str
    items: tuple[tuple[Path, str], ...]  # (image path, caption)
    sample_weight: float

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class SftAuxBatch:
    """images: [n, 3, H, W] float in [0, 1]; captions: n strings."""

    images: torch.Tensor
    captions: list[str]


def _entry_error(source: Path, index: int, message: str) -> SftAuxDataConfigError:
    return SftAuxDataConfigError(
        f"{source}: sftaux_datasets[{index}]: {message} (set SFTAUX_DATASET_CONFIG / --sftaux_dataset_config to "
        "another config, or --sftaux_coef 0 to disable SFT-aux)."
    )


def _read_jsonl(source: Path, index: int, entry: dict, root: Path) -> list[tuple[Path, str]]:
    ann = root / str(entry.get("ann_file", ""))
    if not ann.is_file():
        raise _entry_error(source, index, f"ann_file {ann} not found")
    image_key, caption_key = entry.get("image_key", "image"), entry.get("caption_key", "caption")
    items = []
    for line_no, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            items.append((root / str(record[image_key]), str(record[caption_key])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise _entry_error(source, index, f"{ann}:{line_no}: expected a JSON object with "
                                              f"{image_key!r} and {caption_key!r} ({err})") from err
    return items


def _read_folder(source: Path, index: int, root: Path) -> list[tuple[Path, str]]:
    items = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            raise _entry_error(source, index, f"image {image} has no caption file {caption_file.name} beside it")
        items.append((image, caption_file.read_text(encoding="utf-8").strip()))
    return items


def load_sftaux_config(path: str | Path) -> list[SftAuxDataset]:
    """Read the mmengine config at ``path`` into datasets (every listed image must exist)."""
    from mmengine import Config

    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"SFT-aux config {path!r} not found: set SFTAUX_DATASET_CONFIG / "
                                "--sftaux_dataset_config, or --sftaux_coef 0 to disable SFT-aux.")
    config = Config.fromfile(str(source))
    entries = config.get("sftaux_datasets")
    if not isinstance(entries, (list, tuple)) or not entries:
        raise SftAuxDataConfigError(f"{source}: expected a non-empty list `sftaux_datasets = [dict(...), ...]`.")
    datasets = []
    for index, entry in enumerate(entries):
        entry = dict(entry)
        kind = entry.get("type")
        if kind not in DATASET_TYPES:
            raise _entry_error(source, index, f"type must be one of {', '.join(DATASET_TYPES)}; got {kind!r}")
        root = Path(str(entry.get("data_root", ""))).expanduser()
        root = root if root.is_absolute() else source.parent / root
        if not root.is_dir():
            raise _entry_error(source, index, f"data_root {root} is not a directory")
        if kind == "image_caption_jsonl":
            items = _read_jsonl(source, index, entry, root)
        else:
            items = _read_folder(source, index, root)
        if not items:
            raise _entry_error(source, index, "has no images")
        missing = [str(p) for p, _ in items if not p.is_file()]
        if missing:
            raise _entry_error(source, index, f"{len(missing)} image(s) not found, e.g. {missing[0]}")
        weight = float(entry.get("sample_weight", 1.0))
        if weight <= 0:
            raise _entry_error(source, index, f"sample_weight must be > 0; got {weight}")
        datasets.append(SftAuxDataset(str(entry.get("name", f"sftaux_{index}")), tuple(items), weight))
    return datasets


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """RGB image -> [3, H, W] float in [0, 1]: shorter side resized to cover (H, W), then centre-cropped."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    scale = max(height / rgb.height, width / rgb.width)
    size = (max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale)))
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    rgb = rgb.crop((left, top, left + width, top + height))
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class SftAuxSampler:
    """Seeded, resumable batches of (image, caption) from several datasets (with replacement)."""

    def __init__(self, datasets: Sequence[SftAuxDataset], *, seed: int, height: int, width: int) -> None:
        if not datasets:
            raise ValueError("SftAuxSampler needs at least one dataset.")
        self.datasets = list(datasets)
        self.seed, self.height, self.width = int(seed), int(height), int(width)
        weights = np.array([d.sample_weight * len(d) for d in self.datasets], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.batches_drawn = 0

    def sample(self, first: int, count: int) -> SftAuxBatch:
        """The next batch's items of global indices ``first`` .. ``first + count - 1`` (this rank's slice of the
        step's global SFT-aux batch, core/sftaux_batch.py ``rank_items``)."""
        if count <= 0 or first < 0:
            raise ValueError(f"an SFT-aux batch needs count > 0 items from index >= 0; got {count} from {first}.")
        batch = self.batches_drawn
        self.batches_drawn += 1
        items = [self._draw(batch, first + i) for i in range(count)]
        images = torch.stack([load_image(path, self.height, self.width) for path, _ in items])
        return SftAuxBatch(images=images, captions=[caption for _, caption in items])

    def _draw(self, batch: int, index: int) -> tuple[Path, str]:
        rng = numpy_rng(self.seed, batch, index, 7)  # 7: apart from the prompt sampler's (seed, batch, index)
        dataset = self.datasets[int(rng.choice(len(self.datasets), p=self.probabilities))]
        return dataset.items[int(rng.integers(len(dataset)))]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn,
                "datasets": [d.name for d in self.datasets], "sizes": [len(d) for d in self.datasets]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("datasets") != [d.name for d in self.datasets]:
            raise ValueError(f"SFT-aux sampler checkpoint was saved with datasets {state.get('datasets')}, the current "
                             f"config has {[d.name for d in self.datasets]}.")
        self.seed = int(state["seed"])
        self.batches_drawn = int(state["batches_drawn"])
