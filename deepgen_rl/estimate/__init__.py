"""The estimator's halves that plan a run before it starts (``python -m deepgen_rl.estimate_memory``):
``compute.py`` turns the flags into FLOPs by phase, bytes per rank and predicted seconds per GRPO step
(``--compute``; docs/compute.md). It sits above the trainer because it reads the trainer's batch plan and LoRA
targets; the counting itself lives below the trainer, in ``deepgen_rl/perf/``, so the trainer can log MFU."""
