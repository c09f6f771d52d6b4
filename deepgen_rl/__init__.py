"""deepgen_rl: GRPO reinforcement learning for the DeepGen unified image model (Qwen2.5-VL + SD3.5 Kontext).

Entry points: ``deepgen_rl.grpo_deepgen`` (torchrun training), ``deepgen_rl.eval`` (UniGenBench evaluation),
``deepgen_rl.preflight`` (launch checks), ``deepgen_rl.model.tiny`` (tiny models for CPU runs). See README.md and docs/.
"""

__version__ = "0.1.0"
