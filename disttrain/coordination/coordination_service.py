"""The transport of a multi-worker cluster: TensorFlow's coordination service.

`MultiWorkerMirroredStrategy` starts the service on the chief (rank 0); every
worker reaches its key-value store through TensorFlow's eager context. Unlike a
collective all-reduce it needs no strategy object, carries strings, and its
waits time out instead of hanging. Importing this module imports TensorFlow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorflow as tf
from tensorflow.python.eager import context  # private: tensorflow.python

from disttrain.cluster import Cluster
from disttrain.coordination.transport import PeerLostError, Transport
from disttrain.errors import CoordinationError


class CoordinationServiceTransport(Transport):
    """The key-value store of TensorFlow's coordination service, shared by a cluster.

    The service must be running (create the strategy first) when the first key
    is read or written. A call that fails for any other reason than a missing or
    existing key means the service's host, rank 0, is gone.

    Args:
        cluster: the cluster whose training tasks share the store.

    Example:

    ```python
    disttrain.strategy()
    transport = CoordinationServiceTransport(Cluster.from_env())
    transport.set("disttrain/event/hello", "world")
    ```
    """

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.num_workers = cluster.num_workers
        self._context = None

    def set(self, key: str, value: str) -> bool:
        try:
            with self._service_calls():
                self._service().set_config_key_value(key, value)
        except tf.errors.AlreadyExistsError:
            return False
        return True

    def get(self, key: str, wait: float) -> str | None:
        try:
            with self._service_calls():
                return self._service().get_config_key_value(key, max(int(wait * 1000), 1))
        except tf.errors.DeadlineExceededError:
            return None

    def delete(self, key: str) -> None:
        try:
            with self._service_calls():
                self._service().delete_config_key_value(key)
        except tf.errors.NotFoundError:
            pass

    def check_peer(self, rank: int, wait: float) -> None:
        task_type, index = self.cluster.task_at_rank(rank)
        try:
            self._service().check_collective_ops_peer_health(
                f"/job:{task_type}/replica:0/task:{index}", max(int(wait * 1000), 1))
        except tf.errors.OpError as e:
            raise PeerLostError(rank, e) from e

    def _service(self) -> context.Context:
        if self._context is None:
            ctx = context.context()
            if ctx.coordination_service is None:
                raise CoordinationError(
                    "this process is part of a multi-worker cluster (TF_CONFIG) but "
                    "TensorFlow's coordination service is not running. Fix: create the "
                    "strategy with disttrain.strategy() before fit() or any disttrain callback."
                )
            self._context = ctx
        return self._context

    @contextlib.contextmanager
    def _service_calls(self) -> Iterator[None]:
        """Turns a failed call to the key-value store into losing rank 0, which hosts it."""
        try:
            yield
        except (tf.errors.DeadlineExceededError, tf.errors.AlreadyExistsError,
                tf.errors.NotFoundError):
            raise
        except tf.errors.OpError as e:
            raise PeerLostError(0, e) from e
