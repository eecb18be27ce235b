"""Agreement across workers: votes, broadcasts, barriers and shared errors.

This is the only package in disttrain that talks across workers. A
`Coordinator` runs the protocol (`coordinator.py`) over a `Transport`, a
key-value store shared by the workers (`transport.py`):

- `CoordinationServiceTransport` (`coordination_service.py`) in a multi-worker
  cluster: the key-value store of TensorFlow's coordination service, which
  `MultiWorkerMirroredStrategy` starts on the chief, instead of a collective
  all-reduce. It needs no strategy object (a collective issued through
  `tf.distribute.get_strategy()` outside `strategy.scope()` silently stays
  local), and it can carry strings: run ids, best values, error messages;
- `InProcessTransport` (`in_process.py`) for one worker (every call returns at
  once, without TensorFlow), or for several ranks simulated in threads.

The stall watch (`liveness.py`, `StallWatch`) runs over the same protocol: it names
a live peer that stopped taking part in training and fails the job.

The protocol's guarantees hold over either:

- it never hangs: waits are sliced, and between slices the peer we wait for is
  probed, so a peer that died is reported within about a second; a live peer
  that never reaches the same point fails after `timeout` seconds;
- it detects divergence: each exchange carries the name of its call site, and
  workers that reach different call sites at the same step get an error that
  names both, instead of silently pairing unrelated values;
- it is cheap: an exchange costs each worker but the chief one write and one
  read, whatever the number of workers (the chief reads every entry and
  publishes the combined one); events agreed asynchronously (a preemption's
  stop step) and the stall watch's statuses go through the chief alike; the
  chief deletes finished exchanges in blocks, one call per 64 exchanges;
- a failure on one worker (`run_on_chief`, `raise_if_any`) is raised on every
  worker with the same message.

Every worker must make the same sequence of calls (never inside `if is_chief`).

Example:

```python
coord = coordination.get()
stop = coord.any(local_stop, "EarlyStopping.stop")     # same answer everywhere
run_id = coord.broadcast(new_id if coord.is_chief else None, "run_id")
```
"""

from disttrain.coordination.coordinator import DEFAULT_TIMEOUT, ENV_TIMEOUT, Coordinator, get
from disttrain.coordination.in_process import InProcessTransport
from disttrain.coordination.transport import PeerLostError, Transport

__all__ = ["DEFAULT_TIMEOUT", "ENV_TIMEOUT", "Coordinator", "InProcessTransport",
           "PeerLostError", "Transport", "get"]
