"""The bottom layer: helpers every other package may use and that import nothing else of ``deepgen_rl``.

``distributed`` (rank, collectives, seed derivation), ``sde_checks`` (the SDE step checks and trained-step counts
the flags validate with), ``model_names`` (the environment variables naming the model folders, the trainable
module sets), ``images`` (tensor -> picture grids), ``worker_errors`` (torchrun's root cause). See
docs/architecture.md for the layer order.
"""
