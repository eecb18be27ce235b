"""Digests of what a worker feeds a call: whole arrays (`array_fingerprint`) and single
batches (`batch_digest`). Both read the values in place, so checking an input costs no copy
of it. Used by the input check (`input_check.py`, before a call) and the later-batch
comparison (`later_batches.py`, at each epoch's end)."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

_CHUNK_BYTES = 64 << 20


def array_fingerprint(value: Any) -> dict[str, str]:
    """A digest of every array in `value` (a NumPy array, tensor, or a list / tuple /
    dict of them), keyed by its place in the structure.

    The arrays are hashed in place, a 64 MB view at a time (CRC-32 of the bytes,
    with the dtype and shape): no copy of a contiguous array is made.

    Args:
        value: what `fit`/`evaluate`/`predict` receive as `x`, `y`, `sample_weight`
            or `validation_data`.

    Returns:
        `{"[0]": "float32 (64, 4) crc 1a2b3c4d", ...}` (`""` for a single array).

    Example:

    ```python
    array_fingerprint({"a": np.zeros(3)})   # {"['a']": "float64 (3,) crc ..."}
    ```
    """
    from keras import tree

    return {"".join(f"[{p!r}]" for p in path): array_digest(leaf)
            for path, leaf in tree.flatten_with_path(value) if leaf is not None}


def array_digest(value: Any) -> str:
    """One array's (or one nested structure's) dtype, shape and CRC-32, read in place."""
    import numpy as np
    import tensorflow as tf

    described, crc = [], 0
    for part in tf.nest.flatten(value, expand_composites=True):
        array = np.asarray(part)
        described.append(f"{array.dtype} {array.shape}")
        if array.dtype == object:
            for item in array.ravel():
                crc = zlib.crc32(repr(item).encode(), crc)
            continue
        rows = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes)) if array.ndim else 1
        flat = array if array.ndim else array.reshape(1)
        for start in range(0, len(flat), rows):
            chunk = np.ascontiguousarray(flat[start:start + rows])
            crc = zlib.crc32(chunk.reshape(-1).view(np.uint8), crc)
    return f"{', '.join(described)} crc {crc:08x}"


def batch_digest(structure: Any) -> str | None:
    """A short hash of every tensor in `structure` (dtype, shape and values), read in
    place (a contiguous array is not copied)."""
    import numpy as np
    import tensorflow as tf

    if structure is None:
        return None
    digest = hashlib.blake2b(digest_size=12)
    for tensor in tf.nest.flatten(structure, expand_composites=True):
        if tensor is None:
            digest.update(b"none")
            continue
        array = np.asarray(tensor)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        if array.dtype == object:  # strings
            for item in array.ravel():
                digest.update(len(item).to_bytes(8, "little") + item)
        else:
            digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()
