"""Write a real DeepSpeed checkpoint of the tiny DeepGen model (one rank, CPU/gloo) for converter tests.

    python tests/scripts/write_ds_checkpoint.py --stage 2 --trainable dit_connector --out DIR

Trains one step on a random loss so the saved weights differ from the initial ones, saves DIR/checkpoint-1
with frozen parameters excluded (as the trainer does), and DIR/expected.pt with the trained parameters.
"""

import argparse
import os

import deepspeed
import torch

from deepgen_rl.model.tiny import build_tiny_deepgen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--trainable", default="dit")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = build_tiny_deepgen(seed=0)
    model.set_trainable(args.trainable)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    latents = torch.randn(2, *model.latent_shape(64, 64))
    # Under ZeRO-3 the top-level meta_queries are partitioned; this script only needs the DiT path.
    embeds = torch.randn(2, 5, model.transformer.config.joint_attention_dim)
    pooled = torch.randn(2, model.transformer.config.pooled_projection_dim)
    loss = engine.module.predict_velocity(latents, torch.tensor([0.3, 0.6]), embeds, pooled).square().mean()
    if args.trainable != "dit":
        # Through the submodule's forward, so ZeRO-3 gathers the partitioned weights.
        hidden = torch.randn(2, model.connector.config.hidden_size)
        loss = loss + engine.module.projector_2(hidden).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(args.out, "checkpoint-1"), tag="global_step1", exclude_frozen_parameters=True)
    expected = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            if args.stage == 3:
                with deepspeed.zero.GatheredParameters([param]):
                    expected[name] = param.detach().clone()
            else:
                expected[name] = param.detach().clone()
    torch.save(expected, os.path.join(args.out, "expected.pt"))


if __name__ == "__main__":
    main()
