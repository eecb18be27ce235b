"""Checks users run on their own training scripts: `python -m disttrain.check SUBCOMMAND`.

- `parity`: a few steps of the script in one process and on 2 local workers, the
  weights compared (`docs/parity.md`).
"""
