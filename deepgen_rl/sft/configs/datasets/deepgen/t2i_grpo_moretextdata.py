# SFT-aux dataset of GRPO training (read with mmengine.Config.fromfile by deepgen_rl/sft/aux_data.py).
#
# The loss (1 - sftaux_coef) L_grpo + sftaux_coef L_sft keeps the policy close to real image-text pairs;
# L_sft is the flow-matching loss on a batch drawn from the datasets below (--sftaux_global_batch_size items per
# GRPO step over all ranks).
# Override the whole file with SFTAUX_DATASET_CONFIG=/path/to/your_config.py (or --sftaux_dataset_config).
#
# Each entry of `sftaux_datasets` is one image-caption dataset:
#   type="image_caption_jsonl": `ann_file` (relative to `data_root`) holds one JSON object per line with the
#       image path (relative to `data_root`) under `image_key` and its caption under `caption_key`;
#   type="image_folder": every image in `data_root` (recursively) with its caption in a .txt file of the same
#       stem beside it.
# `sample_weight` (> 0) sets how often a dataset is drawn relative to the others (proportional to
# weight x size, as the RL datasets' sample_proportional mode). `{{ fileDirname }}` is this file's folder.
#
# The default below is the tiny built-in example (assets/sftaux/: 6 synthetic 64x64 PNGs); point
# `data_root` at your own data for real training.

sftaux_datasets = [
    dict(
        type="image_caption_jsonl",
        name="sftaux_example",
        data_root="{{ fileDirname }}/../../../../../assets/sftaux",
        ann_file="captions.jsonl",
        image_key="image",
        caption_key="caption",
        sample_weight=1.0,
    ),
]
