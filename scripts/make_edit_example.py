"""Write the example edit dataset of assets/rl_datasets/edit_example: source images drawn by the synthetic task's
renderer (deepgen_rl/rewards/synthetic.py ``render_prompt``) and an edits.jsonl (data/edit_prompts.py format)
whose instructions turn each source scene into another scene of the same grammar.

    python scripts/make_edit_example.py [--output_dir assets/rl_datasets/edit_example]

The files are committed; tests/test_edit_data.py checks that they are what this script writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepgen_rl.rewards.synthetic import render_prompt

SOURCE_SIZE = 128  # pixels per side; a run resizes sources to its own scale (data/edit_prompts.py)
# (source scene, instruction, the scene the instruction asks for); every scene is of the synthetic grammar.
EDITS: tuple[tuple[str, str, str], ...] = (
    ("a red circle on the left", "make the circle blue", "a blue circle on the left"),
    ("a green square on the right", "move the square to the left", "a green square on the left"),
    ("a yellow circle on the top", "turn the circle into a square", "a yellow square on the top"),
    ("a blue square on the bottom", "add a red circle on the top",
     "a red circle on the top, a blue square on the bottom"),
    ("a red circle on the left, a blue square on the right", "remove the blue square", "a red circle on the left"),
    ("a green circle on the top", "make the circle yellow", "a yellow circle on the top"),
    ("a blue circle on the right", "move the circle to the left", "a blue circle on the left"),
    ("a yellow square on the bottom", "make the square green", "a green square on the bottom"),
)


def image_name(scene: str) -> str:
    """'a red circle on the left, a blue square on the right' -> 'red_circle_left__blue_square_right.png'."""
    parts = [part.strip().removeprefix("a ").replace(" on the ", " ").replace(" ", "_") for part in scene.split(",")]
    return "__".join(parts) + ".png"


def write_edit_example(output_dir: Path) -> Path:
    """Render every source scene into ``output_dir/images`` and write ``output_dir/edits.jsonl``; returns it."""
    images = output_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for source, instruction, _ in EDITS:
        render_prompt(source, SOURCE_SIZE, SOURCE_SIZE).save(images / image_name(source))
        lines.append(json.dumps({"instruction": instruction, "source_images": [f"images/{image_name(source)}"]}))
    path = output_dir / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path,
                        default=Path(__file__).resolve().parents[1] / "assets" / "rl_datasets" / "edit_example")
    print(f"wrote {write_edit_example(parser.parse_args().output_dir)}")


if __name__ == "__main__":
    main()
