"""torchrun, run in this process, whose rendezvous ends in a message instead of a bare store traceback.

    python -m deepgen_rl.launch --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500 \\
        --nproc_per_node 8 --rdzv-conf timeout=600 -m deepgen_rl.grpo_deepgen ...

``scripts/train.sh`` execs this instead of ``python -m torch.distributed.run``: the arguments are torchrun's, and
the process IS the torchrun agent (same signal handling, same worker launch). Only when the nodes fail to meet
(the static rendezvous gives up after ``--rdzv-conf timeout=N`` seconds, ``RDZV_TIMEOUT`` in train.sh) does it
add a last line saying which nodes were expected where and what to check. Worker failures are torchrun's own.
"""

from __future__ import annotations

import sys
from typing import Optional

# torchrun's static rendezvous waits this long when --rdzv-conf has no timeout (torch's own default).
TORCH_DEFAULT_RDZV_TIMEOUT_S = 600


def rendezvous_timeout(rdzv_conf: str) -> int:
    """The ``timeout=`` seconds of a ``--rdzv-conf`` string such as ``"timeout=60,foo=bar"`` (torch's default else)."""
    for item in rdzv_conf.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "timeout" and value.strip():
            return int(value)
    return TORCH_DEFAULT_RDZV_TIMEOUT_S


def rendezvous_failure_message(args, err: BaseException) -> str:
    """What to check when the nodes of a static rendezvous did not meet (``args``: torchrun's parsed flags)."""
    where = f"{args.master_addr}:{args.master_port}"
    role = ("node 0 hosts the rendezvous there and waited for the others" if int(args.node_rank) == 0
            else f"node {args.node_rank} could not join node 0 there")
    return (f"error: the nodes did not meet: NNODES={args.nnodes}, rendezvous at MASTER_ADDR:MASTER_PORT = {where}; "
            f"{role} for {rendezvous_timeout(args.rdzv_conf or '')} s ({type(err).__name__}: {_first_line(err)}). "
            "Start "
            "scripts/train.sh on every node with the same NNODES, MASTER_ADDR (node 0's address, reachable from "
            "every node) and MASTER_PORT, and NODE_RANK 0..NNODES-1; check that MASTER_PORT is open between the "
            "nodes. RDZV_TIMEOUT (seconds) sets how long a node waits for the others.")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()  # torch appends a C++ stack trace to some store errors
    return lines[0] if lines else ""


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun_main
    from torch.distributed.run import parse_args

    argv = sys.argv[1:] if argv is None else argv
    try:
        torchrun_main(argv)
    except (DistError, RendezvousError) as err:  # raised by the agent's rendezvous, before any worker starts
        print(rendezvous_failure_message(parse_args(argv), err), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
