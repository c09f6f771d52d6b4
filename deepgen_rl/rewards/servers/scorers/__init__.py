"""Model scorers served by ``python -m deepgen_rl.rewards.servers.serve`` (one small module each).

All are built on transformers (CLIP, BLIP) with the published checkpoints' keys mapped onto those classes, never on
open_clip / hpsv2 / image-reward (they import torchvision, whose only wheels for our torch are CUDA builds).
"""
