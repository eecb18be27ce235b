"""What a run leaves to read: its files, its training curves and summary, its step timing.

- `run_files`: the name of every file disttrain's callbacks, report and sidecar
  write into a run's directories (imports nothing).
- `history`: a run's training figure (`history.png`) and summary, drawn from
  `history.csv` and `history.json`; `python -m disttrain.report RUN_DIR`.
- `step_timing`: reading each worker's step timing, and the straggler it points to
  (a launcher's summary; no TensorFlow).

Importing this package imports none of them, so a launcher that reads step timing
imports neither the storage layer nor TensorFlow.

Example:

```python
from disttrain.report import history, run_files

run = history.read_run("runs/20261202-031721-c9612e")
print(history.summary(run), run_files.HISTORY_FIGURE)
```
"""
