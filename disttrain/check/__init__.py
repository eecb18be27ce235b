"""Checks users run: `python -m disttrain.check [SUBCOMMAND]`.

- `cluster` (the default): run under a launcher on the real cluster, prints what
  disttrain derived, times an all-reduce between all tasks and probes the checkpoint
  URL (`docs/launchers.md`).
- `parity`: a few steps of the script in one process and on 2 local workers, the
  weights compared (`docs/parity.md`).
- `gpu`: on one machine with 2 or more GPUs, the replica count, the NCCL all-reduce
  bandwidth and a 2-GPU `fit` against one device (`docs/verification.md`).
"""
