"""The key-value store that coordination exchanges travel through.

A `Transport` is shared by the workers of one group: each worker writes keys
that its peers read. The protocol in `disttrain.coordination.coordinator` needs
nothing else from it, so the same exchanges run over TensorFlow's coordination
service (`CoordinationServiceTransport`, between the processes of a
multi-worker cluster) and over a dictionary in memory (`InProcessTransport`,
one worker, or several simulated in threads).
"""

from __future__ import annotations

import abc

from disttrain.errors import CoordinationError


class PeerLostError(CoordinationError):
    """A transport call failed because the worker of rank `rank` is gone.

    The coordinator turns it into an error naming the worker and the exchange.

    Args:
        rank: the rank of the worker that exited or became unreachable.
        error: what the transport saw.
    """

    def __init__(self, rank: int, error: BaseException):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.rank = rank
        self.error = error
        self.detail = f"{type(error).__name__}: {first_line[:200]}"
        super().__init__(f"lost the worker of rank {rank}: {self.detail}")


class Transport(abc.ABC):
    """A key-value store shared by the `num_workers` workers of one group.

    Keys are `/`-separated paths; values are strings. A key is written once
    (first write wins) until it is deleted.

    Example:

    ```python
    transport = InProcessTransport()
    transport.set("disttrain/0/0/0", "hello")     # True: stored
    transport.get("disttrain/0/0/0", wait=1.0)    # "hello"
    transport.delete("disttrain/0")               # the key and everything below it
    ```
    """

    num_workers: int
    """How many workers share this store (ranks 0 to `num_workers - 1`)."""

    @abc.abstractmethod
    def set(self, key: str, value: str) -> bool:
        """Stores `value` under `key` unless `key` is set; True when this call stored it.

        Raises:
            PeerLostError: the store is unreachable (its host, rank 0, is gone).
        """

    @abc.abstractmethod
    def get(self, key: str, wait: float) -> str | None:
        """The value of `key`, waiting up to `wait` seconds for it; None if still unset.

        Raises:
            PeerLostError: the store is unreachable (its host, rank 0, is gone).
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Deletes `key` and every key below `key/`; does nothing when there are none.

        Raises:
            PeerLostError: the store is unreachable (its host, rank 0, is gone).
        """

    @abc.abstractmethod
    def check_peer(self, rank: int, wait: float) -> None:
        """Returns if the worker of `rank` is alive, probing it for up to `wait` seconds.

        Raises:
            PeerLostError: the worker of `rank` exited or is unreachable.
        """
