"""``python -m deepgen_rl.preflight [--world_size N] <training flags>`` (run by scripts/train.sh before torchrun)."""

import sys

from deepgen_rl.preflight import main

sys.exit(main())
