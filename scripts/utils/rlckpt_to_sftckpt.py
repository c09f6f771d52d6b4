#!/usr/bin/env python
"""Convert an RL checkpoint (checkpoint-N folder: DeepSpeed ZeRO-2/3 or a plain state dict) to an SFT .pth.

    python scripts/utils/rlckpt_to_sftckpt.py --rl_checkpoint outputs/run/checkpoint-40 --output rl_step40.pth
    python scripts/utils/rlckpt_to_sftckpt.py --rl_checkpoint outputs/run/checkpoint-40 --weights ema --output ema40.pth

The .pth has the DeepGen reference key names and holds what RL trained; load it on top of the pretraining
checkpoint with xtuner's guess_load_checkpoint + model.load_state_dict(state_dict, strict=False).

A --use_lora run's DiT adapter is merged into the DiT at the run's own lora_alpha / lora_rank (read from the
checkpoint's trainer_state.json), on the DiT the run started from (its --sd3_model_name_or_path and --checkpoint,
or the ones given here): the .pth then holds every transformer.* weight. --keep_lora instead writes a peft adapter
folder (adapter_config.json + adapter_model.safetensors):

    python scripts/utils/rlckpt_to_sftckpt.py --rl_checkpoint outputs/run/checkpoint-40 --keep_lora --output lora40/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a clone without `pip install -e .`

from deepgen_rl.model.convert import DTYPES, WEIGHTS, convert_rl_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rl_checkpoint", required=True, help="checkpoint-N folder written by the GRPO trainer.")
    parser.add_argument("--output", required=True, help="Path of the .pth to write.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved tensors.")
    parser.add_argument("--weights", default="raw", choices=WEIGHTS,
                        help="'raw': the trained weights; 'ema': their EMA (runs with --ema_decay > 0 save it as "
                        "checkpoint-N/ema.pt).")
    parser.add_argument("--keep_lora", action="store_true",
                        help="LoRA runs: write the DiT adapter as a peft adapter folder at --output instead of "
                        "merging it into the DiT weights.")
    parser.add_argument("--sd3_model_name_or_path", default="",
                        help="LoRA merge: the diffusers SD3.5 folder the run trained on (default: the run's own, from "
                        "its checkpoint's trainer_state.json).")
    parser.add_argument("--checkpoint", default=None,
                        help="LoRA merge: the pretraining .pth (CHECKPOINT) the run loaded (default: the run's own).")
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="LoRA: the run's --lora_alpha, only for a checkpoint that does not record it.")
    args = parser.parse_args(argv)
    try:
        summary = convert_rl_checkpoint(args.rl_checkpoint, args.output, args.dtype, args.weights,
                                        keep_lora=args.keep_lora, sd3_model_name_or_path=args.sd3_model_name_or_path,
                                        checkpoint=args.checkpoint, lora_alpha=args.lora_alpha)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
