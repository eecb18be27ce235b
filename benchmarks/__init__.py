"""disttrain's benchmarks: `python -m benchmarks [--quick | --smoke]` prints one table.

One module a concern: `train_step` (vs one process and tf_keras; the step's
collectives via `collectives`), `batchnorm`, `vote`, `scaling`, `checkpoint`,
`early_stopping`, `launcher`; `report` (statistics, table), `settings` (sizes per
mode), `cluster` and `timing` (helpers). `faults` is a separate fault-injection run
(`python -m benchmarks.faults`).
"""
