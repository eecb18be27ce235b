"""Agreement across workers: votes, broadcasts, barriers and shared errors.

This is the only module in disttrain that talks across workers. It uses the
key-value store of TensorFlow's coordination service, which
`MultiWorkerMirroredStrategy` starts on the chief, instead of a collective
all-reduce:

- it needs no strategy object (a collective issued through
  `tf.distribute.get_strategy()` outside `strategy.scope()` silently stays
  local), and it can carry strings: run ids, best values, error messages;
- it never hangs: waits are sliced, and between slices the peer we wait for is
  probed, so a peer that died is reported within about a second; a live peer
  that never reaches the same point fails after `timeout` seconds;
- it detects divergence: each exchange carries the name of its call site, and
  workers that reach different call sites at the same step get an error that
  names both, instead of silently pairing unrelated values;
- it is cheap: an exchange costs each worker one write and one read per peer
  (about 0.7 ms between two local processes), and the chief deletes finished
  exchanges in blocks, one call per 64 exchanges.

Every worker must make the same sequence of calls (never inside `if is_chief`).
On a single worker every call returns at once without TensorFlow.

Example:

```python
coord = coordination.get()
stop = coord.any(local_stop, "EarlyStopping.stop")     # same answer everywhere
run_id = coord.broadcast(new_id if coord.is_chief else None, "run_id")
```
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable

from disttrain import errors
from disttrain.cluster import Cluster, new_run_id
from disttrain.errors import CoordinationError, DisttrainError

ENV_TIMEOUT = "DISTTRAIN_COORDINATION_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
_POLL_MS = 500
_KEY_PREFIX = "disttrain"
# Exchange keys live in blocks of this many exchanges; the chief deletes a block,
# one directory in the key-value store, once every worker is past it.
_KEYS_PER_BLOCK = 64
_default_lock = threading.RLock()
_instances: list = []


def _default_timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise CoordinationError(
            f"{ENV_TIMEOUT}={raw!r} is not a positive number of seconds. "
            f"Fix: set it to e.g. 600, or unset it for the default {DEFAULT_TIMEOUT:.0f}."
        )
    return value


class Coordinator:
    """Agreement among the training tasks of one cluster; one per process (`get()`).

    Args:
        cluster: the cluster; default `Cluster.from_env()`.
        timeout: seconds to wait for a live peer before failing; default
            `DISTTRAIN_COORDINATION_TIMEOUT` or 1800 (long enough for the chief to
            write a large checkpoint to object storage while the others wait).
    """

    def __init__(self, cluster: Cluster | None = None, timeout: float | None = None):
        with _default_lock:
            if _instances:
                raise CoordinationError(
                    "a Coordinator already exists in this process; exchanges of two "
                    "coordinators would collide. Fix: use disttrain.coordination.get()."
                )
            _instances.append(self)
        self.cluster = cluster or Cluster.from_env()
        self.timeout = _default_timeout() if timeout is None else float(timeout)
        self._seq = 0
        self._context = None
        self._run_id: str | None = None
        self._local_events: dict[str, str] = {}

    def run_id(self) -> str:
        """The run id, identical on every worker.

        `DISTTRAIN_RUN_ID` when the launcher set it, else generated once by the
        chief (`<utc time>-<6 hex>`) and broadcast; cached for the process.
        """
        if self._run_id is None:
            if self.cluster.run_id:
                self._run_id = self.cluster.run_id
            elif self._is_local:
                self._run_id = new_run_id()
            else:
                self._run_id = self.broadcast(new_run_id() if self.is_chief else None, "run_id")
        return self._run_id

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    @property
    def rank(self) -> int:
        return max(self.cluster.worker_rank, 0)

    @property
    def num_workers(self) -> int:
        return 1 if self._is_local else self.cluster.num_workers

    @property
    def _is_local(self) -> bool:
        return not self.cluster.is_multi_worker or self.cluster.is_evaluator

    def gather(self, name: str, value: str, timeout: float | None = None) -> list[str]:
        """Every worker contributes `value`; all get the list of values in rank order.

        Args:
            name: the call site, e.g. `"ModelCheckpoint.save"`; must be the same on
                every worker for the same step.
            value: this worker's string.
            timeout: seconds to wait for live peers; default `self.timeout`.

        Raises:
            CoordinationError: a peer died, timed out, or reached a different call site.
        """
        if self._is_local:
            return [value]
        ctx = self._tf_context()
        seq = self._seq
        self._seq += 1
        with self._service_calls(name):
            ctx.set_config_key_value(
                self._key(seq, self.rank), json.dumps({"name": name, "value": value})
            )
        values = []
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for rank in range(self.num_workers):
            if rank == self.rank:
                values.append(value)
                continue
            raw = self._wait_for(ctx, self._key(seq, rank), rank, name, deadline, limit)
            entry = json.loads(raw)
            if entry["name"] != name:
                raise CoordinationError(
                    f"workers diverged at exchange #{seq}: {self._label(self.rank)} is at "
                    f"{name!r} but {self._label(rank)} is at {entry['name']!r}. Every worker "
                    "must make the same disttrain calls in the same order; check for code that "
                    "runs on some workers only (e.g. a callback added only on the chief)."
                )
            values.append(entry["value"])
        if self.is_chief and seq % _KEYS_PER_BLOCK == 0 and seq > 0:
            # Every worker has set its key of `seq`, so it has read every key before it.
            with self._service_calls(name):
                ctx.delete_config_key_value(self._block(seq // _KEYS_PER_BLOCK - 1))
        return values

    def any(self, flag: bool, name: str, timeout: float | None = None) -> bool:
        """True on every worker when `flag` is true on at least one."""
        return "1" in self.gather(name, "1" if flag else "0", timeout)

    def all(self, flag: bool, name: str, timeout: float | None = None) -> bool:
        """True on every worker when `flag` is true on all of them."""
        return "0" not in self.gather(name, "1" if flag else "0", timeout)

    def broadcast(self, value: str | None, name: str, timeout: float | None = None) -> str:
        """Returns the chief's `value` on every worker (others pass anything, e.g. None)."""
        if self.is_chief and value is None:
            raise CoordinationError(
                f"broadcast {name!r}: the chief passed None. Fix: pass the value to share."
            )
        return self.gather(name, value if self.is_chief else "", timeout)[0]

    def barrier(self, name: str, timeout: float | None = None) -> None:
        """Returns when every worker has reached `barrier(name)`."""
        self.gather(name, "", timeout)

    def run_on_chief(
        self,
        name: str,
        action: Callable[[], object],
        error_type: type[DisttrainError] = CoordinationError,
        timeout: float | None = None,
    ) -> object:
        """Runs `action` on the chief only; returns its result on every worker, and
        its failure is raised on every worker.

        Other workers wait (up to `timeout`) for the chief's outcome: one exchange
        carries the result (JSON-serialisable) or the error. If the chief's action
        raises, every worker raises `error_type` with the same message (the chief's
        is chained to the original exception), so a failed checkpoint write ends
        the job everywhere instead of leaving peers blocked.
        """
        error, result = None, None
        if self.is_chief:
            try:
                result = action()
            except Exception as e:  # noqa: BLE001 - reported to every worker, then raised
                error = e
        outcome = json.dumps({"error": _report(error), "result": result}) if self.is_chief else ""
        chief = json.loads(self.gather(name, outcome, timeout)[0])
        self._raise_first(name, [chief["error"]], error, error_type)
        return chief["result"]

    def raise_if_any(
        self,
        name: str,
        error: BaseException | None,
        error_type: type[DisttrainError] = CoordinationError,
        timeout: float | None = None,
    ) -> None:
        """Shares each worker's error (or None); if any worker had one, all raise it.

        Every worker raises the first failed worker's error: as the same disttrain
        error class when it was one (a `CallbackConfigError` stays one), else as
        `error_type`, with the same message naming the worker and the original error.
        """
        self._raise_first(name, self.gather(name, _report(error), timeout), error, error_type)

    def _raise_first(self, name: str, reports: list[str], error: BaseException | None,
                     error_type: type[DisttrainError]) -> None:
        """Raises the first failure among `reports` (one per rank, "" for none)."""
        failed = [(rank, json.loads(msg)) for rank, msg in enumerate(reports) if msg]
        if not failed:
            return
        rank, report = failed[0]
        same = getattr(errors, report["type"], None)
        if isinstance(same, type) and issubclass(same, DisttrainError):
            error_type = same
        message = f"{name} failed on {self._label(rank)}: {report['message']}"
        if error is not None and rank == self.rank:
            raise error_type(message) from error
        raise error_type(message)

    def post(self, event: str, value: str) -> bool:
        """Publishes `value` under the named one-time event `event`, visible to every worker.

        Unlike the exchanges above, posting is not a step every worker takes:
        any thread of any worker may post at any time, and the first post of an
        event wins. Used for announcements that arrive asynchronously (a worker
        got SIGTERM). Returns True when this call's value is the one stored.
        """
        if self._is_local:
            self._local_events.setdefault(event, value)
            return self._local_events[event] == value
        import tensorflow as tf

        try:
            with self._service_calls(f"post {event}"):
                self._tf_context().set_config_key_value(self._event_key(event), value)
        except tf.errors.AlreadyExistsError:
            return False
        return True

    def poll(self, event: str, wait: float = 0.0) -> str | None:
        """The value posted under `event`, waiting up to `wait` seconds; None if none yet."""
        if self._is_local:
            return self._local_events.get(event)
        import tensorflow as tf

        try:
            with self._service_calls(f"poll {event}"):
                return self._tf_context().get_config_key_value(
                    self._event_key(event), max(int(wait * 1000), 1))
        except tf.errors.DeadlineExceededError:
            return None

    def collect(self, event: str, timeout: float | None = None) -> list[str]:
        """Waits until every worker posted `f"{event}/<rank>"`; their values in rank order.

        A dead peer is reported within about a second and a live one that never
        posts fails after `timeout` (default `self.timeout`), as in `gather`.
        """
        if self._is_local:
            return [self._local_events[f"{event}/0"]]
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        return [self._wait_for(self._tf_context(), self._event_key(f"{event}/{rank}"), rank,
                               event, deadline, limit)
                for rank in range(self.num_workers)]

    def set_status(self, value: str) -> None:
        """Replaces this worker's status line, which any worker can read with `statuses()`."""
        if self._is_local:
            return
        import tensorflow as tf

        ctx = self._tf_context()
        key = self._event_key(f"status/{self.rank}")
        with self._service_calls("set_status"):
            try:
                ctx.delete_config_key_value(key)
            except tf.errors.NotFoundError:
                pass
            ctx.set_config_key_value(key, value)

    def statuses(self) -> list[str | None]:
        """Every worker's latest status line in rank order (None where none was set)."""
        if self._is_local:
            return [None]
        return [self.poll(f"status/{rank}") for rank in range(self.num_workers)]

    def _label(self, rank: int) -> str:
        return self.cluster.label_of_rank(rank)

    def _task_name(self, rank: int) -> str:
        task_type, index = self.cluster.task_at_rank(rank)
        return f"/job:{task_type}/replica:0/task:{index}"

    @staticmethod
    def _block(block: int) -> str:
        return f"{_KEY_PREFIX}/{block}"

    @classmethod
    def _key(cls, seq: int, rank: int) -> str:
        return f"{cls._block(seq // _KEYS_PER_BLOCK)}/{seq}/{rank}"

    @staticmethod
    def _event_key(event: str) -> str:
        return f"{_KEY_PREFIX}/event/{event}"

    def _tf_context(self):
        if self._context is None:
            from tensorflow.python.eager import context

            ctx = context.context()
            if ctx.coordination_service is None:
                raise CoordinationError(
                    "this process is part of a multi-worker cluster (TF_CONFIG) but "
                    "TensorFlow's coordination service is not running. Fix: create the "
                    "strategy with disttrain.strategy() before fit() or any disttrain callback."
                )
            self._context = ctx
        return self._context

    def _wait_for(
        self, ctx, key: str, rank: int, name: str, deadline: float, limit: float
    ) -> str:
        import tensorflow as tf

        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise CoordinationError(
                    f"timed out at {name!r} waiting for {self._label(rank)}: it is alive but "
                    f"did not get there within {limit:.0f}s. Workers may have diverged "
                    f"(one is stuck or runs different code). Fix: check {self._label(rank)}'s "
                    f"log; raise the limit with {ENV_TIMEOUT} if it is just slow."
                )
            try:
                with self._service_calls(name):
                    return ctx.get_config_key_value(key, min(_POLL_MS, remaining_ms))
            except tf.errors.DeadlineExceededError:
                pass
            if rank != self.rank:
                try:
                    ctx.check_collective_ops_peer_health(self._task_name(rank), _POLL_MS)
                except tf.errors.OpError as e:
                    raise self._peer_lost(rank, name, e) from e

    @contextlib.contextmanager
    def _service_calls(self, name: str):
        """Turns a failed call to the key-value store into losing rank 0, which hosts it."""
        import tensorflow as tf

        try:
            yield
        except (tf.errors.DeadlineExceededError, tf.errors.AlreadyExistsError,
                tf.errors.NotFoundError):
            raise
        except tf.errors.OpError as e:
            raise self._peer_lost(0, name, e) from e

    def _peer_lost(self, rank: int, name: str, error: Exception) -> CoordinationError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return CoordinationError(
            f"lost {self._label(rank)} at {name!r}: {type(error).__name__}: {first_line[:200]}. "
            "The peer process exited or is unreachable; see its log for the cause."
        )



def _report(error: BaseException | None) -> str:
    """An error as exchanged between workers ("" for none)."""
    if error is None:
        return ""
    return json.dumps({"type": type(error).__name__, "message": f"{type(error).__name__}: {error}"})


_default: Coordinator | None = None


def get() -> Coordinator:
    """The process-wide coordinator every disttrain callback shares.

    Sharing one matters: exchanges are numbered per coordinator, and every
    worker must number the same exchange the same way.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = Coordinator()
        return _default
