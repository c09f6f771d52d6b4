"""Model reward servers: PickScore, HPSv2.1, ImageReward, LAION aesthetic (FastAPI + uvicorn, JSON + base64 PNG).

    python -m deepgen_rl.rewards.servers.serve NAME [NAME ...] [--port PORT]     # or: bash scripts/reward_server.sh NAME

One process loads each named scorer once from LOCAL paths (flags, or the environment variables their help names;
nothing is downloaded) and serves it at ``/NAME/score`` -- and at ``/score`` too when it is the only one. Contract:
``deepgen_rl.rewards.protocol`` (ScoreRequest -> ScoreResponse; 400 naming the bad item; 413 over the body limit).
The GPU is the one CUDA_VISIBLE_DEVICES shows first; ``--device cpu`` works for small models and tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from deepgen_rl.rewards.servers.core import ServerLimits, env_number
from deepgen_rl.rewards.servers.scorers import aesthetic, hpsv2, image_reward, pickscore

logger = logging.getLogger("deepgen_rl.scorer_server")

# name -> module with add_arguments(parser) and load(args, device, dtype); the names are the dataset YAML's rewards.
SCORERS = {module.NAME: module for module in (pickscore, hpsv2, image_reward, aesthetic)}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_arg_parser() -> argparse.ArgumentParser:
    limits = ServerLimits()
    p = argparse.ArgumentParser(prog="python -m deepgen_rl.rewards.servers.serve", description=__doc__.split("\n")[0])
    p.add_argument("scorers", nargs="+", choices=tuple(SCORERS), metavar="NAME",
                   help=f"scorer(s) to load and serve: {', '.join(SCORERS)}")
    p.add_argument("--host", default=os.environ.get("REWARD_SERVER_HOST", "0.0.0.0"),
                   help="bind address ($REWARD_SERVER_HOST)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: the one training's --<name>_url defaults to, for a single scorer)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype; auto = bfloat16 on GPU, else float32")
    p.add_argument("--batch-size", type=int, default=env_number("REWARD_SERVER_BATCH_SIZE", 16, int),
                   help="images per model forward ($REWARD_SERVER_BATCH_SIZE)")
    p.add_argument("--max-batch-items", type=int, default=limits.max_batch_items, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels)
    p.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2**20,
                   help="largest request body in MiB; larger ones get HTTP 413 before being read")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    for module in SCORERS.values():
        module.add_arguments(p)
    return p


def _device_and_dtype(device: Optional[str], dtype: str):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def default_port(names: list[str]) -> int:
    """The port training's URL for this scorer defaults to (one place: deepgen_rl.rewards.scorer_clients)."""
    from deepgen_rl.rewards.scorer_clients import SCORER_CLIENTS

    if len(names) != 1:
        raise SystemExit("error: serving several scorers in one process needs --port (their URLs are then "
                         "http://<host>:<port>/<name>).")
    return SCORER_CLIENTS[names[0]].port


def main(argv: Optional[list[str]] = None) -> None:
    args = build_arg_parser().parse_args(argv)
    names = list(dict.fromkeys(args.scorers))
    port = args.port if args.port is not None else default_port(names)
    if args.max_body_mb <= 0:
        raise SystemExit(f"error: --max-body-mb must be > 0; got {args.max_body_mb}.")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    try:
        scorers = [SCORERS[name].load(args, device, dtype) for name in names]
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    logger.info("loaded %s on %s (%s)", ", ".join(names), device, dtype)
    import uvicorn

    from deepgen_rl.rewards.servers.scorer_app import create_scorer_app

    app = create_scorer_app(scorers, args.batch_size, ServerLimits(
        max_batch_items=args.max_batch_items, max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * 2**20)))
    uvicorn.run(app, host=args.host, port=port, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
