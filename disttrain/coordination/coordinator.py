"""The agreement protocol: ordered exchanges, shared errors, events and statuses.

Every exchange is numbered per coordinator; each worker writes its value under
`disttrain/<seq // 64>/<seq>/<rank>`. The chief reads them all, checks that every
worker is at the same call site, and publishes the values (or what went wrong:
a lost or late peer, a divergence) under `disttrain/<seq // 64>/<seq>/all`,
which every other worker reads. So a worker makes two calls to the key-value
store per exchange and the chief 2N, where every worker reading every peer's
key would cost N·(N−1) calls on the chief's store. The chief deletes a block of
64 exchanges (one directory) once every worker is past it.

Asynchronous agreement follows the same star: each worker posts one event
(`post`), the chief alone reads them all (`collect`) and posts the outcome,
which every other worker reads with one call (`wait_for_post`). Statuses work
alike: every worker replaces its own line (`set_status`); the stall watch reads
all lines on the chief only (`statuses`) and republishes them in the chief's.
What carries the keys is the coordinator's `Transport`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator

from disttrain import errors
from disttrain.cluster import Cluster, new_run_id
from disttrain.coordination import chief_only
from disttrain.coordination.in_process import InProcessTransport
from disttrain.coordination.transport import PeerLostError, Transport
from disttrain.errors import CoordinationError, DisttrainError

ENV_TIMEOUT = "DISTTRAIN_COORDINATION_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
_POLL_S = 0.5
_KEY_PREFIX = "disttrain"
# Exchange keys live in blocks of this many exchanges; the chief deletes a block,
# one directory in the key-value store, once every worker is past it.
_KEYS_PER_BLOCK = 64
# The chief publishes an exchange's values (or its failure) under this name beside the
# workers' keys: every worker makes one write and one read per exchange, whatever N.
_COMBINED = "all"
_VERDICT_SLACK_S = 5.0
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


def _transport_for(cluster: Cluster) -> Transport:
    """TensorFlow's coordination service for a training task of a multi-worker
    cluster; else (one worker, or an evaluator) a store of this process's own."""
    if cluster.is_multi_worker and not cluster.is_evaluator:
        from disttrain.coordination.coordination_service import CoordinationServiceTransport

        return CoordinationServiceTransport(cluster)
    return InProcessTransport()


class Coordinator:
    """Agreement among the training tasks of one cluster; one per process (`get()`).

    Args:
        cluster: the cluster; default `Cluster.from_env()`.
        timeout: seconds to wait for a live peer before failing; default
            `DISTTRAIN_COORDINATION_TIMEOUT` or 1800 (long enough for the chief to
            write a large checkpoint to object storage while the others wait).
        transport: the key-value store shared with the peers; default
            TensorFlow's coordination service in a multi-worker cluster, else an
            `InProcessTransport`. Only one coordinator per process may use the
            default; pass a transport to build others (e.g. simulated ranks in
            threads sharing one `InProcessTransport(num_workers=n)`).

    Example:

    ```python
    coord = coordination.get()
    stop = coord.any(local_stop, "EarlyStopping.stop")     # same answer everywhere
    ```
    """

    def __init__(self, cluster: Cluster | None = None, timeout: float | None = None,
                 transport: Transport | None = None):
        if transport is None:
            with _default_lock:
                if _instances:
                    raise CoordinationError(
                        "a Coordinator already exists in this process; exchanges of two "
                        "coordinators would collide. Fix: use disttrain.coordination.get()."
                    )
                _instances.append(self)
        self.cluster = cluster or Cluster.from_env()
        self.timeout = _default_timeout() if timeout is None else float(timeout)
        self.transport = transport or _transport_for(self.cluster)
        self._seq = 0
        self._run_id: str | None = None
        self._waiting: collections.Counter[int] = collections.Counter()

    def run_id(self) -> str:
        """The run id, identical on every worker.

        `DISTTRAIN_RUN_ID` when the launcher set it, else generated once by the
        chief (`<utc time>-<6 hex>`) and broadcast; cached for the process.

        Raises:
            ClusterConfigError: on the evaluator task without `DISTTRAIN_RUN_ID`:
                it is outside the training group, so no chief can tell it the id.
        """
        if self._run_id is None:
            if self.cluster.run_id or self.cluster.is_evaluator:
                self._run_id = self.cluster.required_run_id()
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
        return self.transport.num_workers

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
        chief_only.refuse(f"the agreement {name!r}")
        seq = self._seq
        self._seq += 1
        key = self._key(seq, self.rank)
        with self._transport_calls(name):
            stored = self.transport.set(key, json.dumps({"name": name, "value": value}))
        if not stored:
            raise CoordinationError(
                f"exchange key {key!r} at {name!r} was already written: another process "
                f"coordinates as {self._label(self.rank)} through the same store. Fix: start "
                "each task of the cluster once, with its own TF_CONFIG task index."
            )
        limit = self.timeout if timeout is None else timeout
        if self.rank == 0:
            values = self._combine(seq, name, value, limit)
        else:
            # The chief's verdict on a peer that never came arrives after `limit` on its
            # own clock; wait a little longer, so that verdict, naming the peer, is raised.
            combined = json.loads(self._wait_for(self._key(seq, _COMBINED), 0, name,
                                                 time.monotonic() + limit + _VERDICT_SLACK_S,
                                                 limit))
            if "error" in combined:
                raise CoordinationError(combined["error"])
            values = combined["values"]
        if self.rank == 0 and seq % _KEYS_PER_BLOCK == 0 and seq > 0:
            # Every worker has set its key of `seq`, so it has read every key before it.
            with self._transport_calls(name):
                self.transport.delete(self._block(seq // _KEYS_PER_BLOCK - 1))
        return values

    def _combine(self, seq: int, name: str, value: str, limit: float) -> list[str]:
        """Rank 0's (the chief's) side of exchange `seq`: reads every worker's entry, checks they
        are all at `name`, and publishes the values (or the failure) in one key."""
        values = [value]
        deadline = time.monotonic() + limit
        try:
            for rank in range(1, self.num_workers):
                entry = json.loads(self._wait_for(self._key(seq, rank), rank, name,
                                                  deadline, limit))
                if entry["name"] != name:
                    raise CoordinationError(
                        f"workers diverged at exchange #{seq}: {self._label(0)} is at "
                        f"{name!r} but {self._label(rank)} is at {entry['name']!r}. Every "
                        "worker must make the same disttrain calls in the same order; check "
                        "for code that runs on some workers only (e.g. a callback added only "
                        "on the chief)."
                    )
                values.append(entry["value"])
        except CoordinationError as e:
            with contextlib.suppress(CoordinationError):
                with self._transport_calls(name):
                    self.transport.set(self._key(seq, _COMBINED), json.dumps({"error": str(e)}))
            raise
        with self._transport_calls(name):
            self.transport.set(self._key(seq, _COMBINED), json.dumps({"values": values}))
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
        got SIGTERM). Returns True when this call's value is the one stored,
        False when the event was already posted.
        """
        with self._transport_calls(f"post {event}"):
            return self.transport.set(self._event_key(event), value)

    def poll(self, event: str, wait: float = 0.0) -> str | None:
        """The value posted under `event`, waiting up to `wait` seconds; None if none yet."""
        with self._transport_calls(f"poll {event}"):
            return self.transport.get(self._event_key(event), wait)

    def collect(self, event: str, timeout: float | None = None,
                cancel: threading.Event | None = None) -> list[str | None]:
        """Waits until every worker posted `f"{event}/<rank>"`; their values in rank order.

        N reads: meant for the chief, which then posts the outcome for the others
        to read with `wait_for_post`. A dead peer is reported within about a
        second and a live one that never posts fails after `timeout` (default
        `self.timeout`), as in `gather`.

        Args:
            event: the event name; worker `r` posts `f"{event}/{r}"`.
            timeout: seconds to wait for live peers; default `self.timeout`.
            cancel: when set, stop waiting: the values not posted by then are None.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        return [self._wait_for(self._event_key(f"{event}/{rank}"), rank, event, deadline, limit,
                               cancel)
                for rank in range(self.num_workers)]

    def wait_for_post(self, event: str, poster: int = 0, timeout: float | None = None) -> str:
        """The value of `event`, waiting for the worker of rank `poster` to post it.

        One read, however many workers there are. Fails within about a second
        when `poster` dies, and after `timeout` (default `self.timeout`, plus a
        few seconds for a verdict the poster reached after its own timeout) when
        it lives but never posts.
        """
        limit = self.timeout if timeout is None else timeout
        return self._wait_for(self._event_key(event), poster, event,
                              time.monotonic() + limit + _VERDICT_SLACK_S, limit)

    def set_status(self, value: str) -> None:
        """Replaces this worker's status line (two calls), which `statuses()` reads."""
        key = self._event_key(f"status/{self.rank}")
        with self._transport_calls("set_status"):
            self.transport.delete(key)
            self.transport.set(key, value)

    def statuses(self) -> list[str | None]:
        """Every worker's latest status line in rank order (None where none was set).

        N reads: the stall watch calls it on the chief only.
        """
        return [self.poll(f"status/{rank}") for rank in range(self.num_workers)]

    def _label(self, rank: int) -> str:
        return self.cluster.label_of_rank(rank)

    @staticmethod
    def _block(block: int) -> str:
        return f"{_KEY_PREFIX}/{block}"

    @classmethod
    def _key(cls, seq: int, rank: int) -> str:
        return f"{cls._block(seq // _KEYS_PER_BLOCK)}/{seq}/{rank}"

    @staticmethod
    def _event_key(event: str) -> str:
        return f"{_KEY_PREFIX}/event/{event}"

    def is_waiting(self, thread: threading.Thread) -> bool:
        """Whether `thread` is waiting for a peer's key in one of this coordinator's exchanges.

        Example:

        ```python
        coord.is_waiting(threading.main_thread())   # e.g. from a watchdog thread
        ```
        """
        return self._waiting[thread.ident] > 0

    def _wait_for(self, key: str, rank: int, name: str, deadline: float, limit: float,
                  cancel: threading.Event | None = None) -> str | None:
        """Reads `key`, written by `rank`, in slices; between slices probes that peer.
        Returns None when `cancel` is set before the key is."""
        thread = threading.get_ident()
        self._waiting[thread] += 1
        try:
            return self._read_when_written(key, rank, name, deadline, limit, cancel)
        finally:
            self._waiting[thread] -= 1

    def _read_when_written(self, key: str, rank: int, name: str, deadline: float, limit: float,
                           cancel: threading.Event | None) -> str | None:
        with self._transport_calls(name):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CoordinationError(
                        f"timed out at {name!r} waiting for {self._label(rank)}: it is alive "
                        f"but did not get there within {limit:.0f}s. Workers may have diverged "
                        f"(one is stuck or runs different code). Fix: check "
                        f"{self._label(rank)}'s log; raise the limit with {ENV_TIMEOUT} if it "
                        "is just slow."
                    )
                value = self.transport.get(key, min(_POLL_S, remaining))
                if value is not None:
                    return value
                if cancel is not None and cancel.is_set():
                    return None
                if rank != self.rank:
                    self.transport.check_peer(rank, _POLL_S)

    @contextlib.contextmanager
    def _transport_calls(self, name: str) -> Iterator[None]:
        """Turns a lost peer into an error naming it and the exchange `name`."""
        try:
            yield
        except PeerLostError as lost:
            raise CoordinationError(
                f"lost {self._label(lost.rank)} at {name!r}: {lost.detail}. "
                "The peer process exited or is unreachable; see its log for the cause."
            ) from lost.error


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

    Example:

    ```python
    coord = coordination.get()
    coord.barrier("data_ready")
    ```
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = Coordinator()
        return _default
