"""Durable reads, writes and deletes through fsspec, for checkpoints and logs.

The only part of disttrain that touches storage. It works on local paths,
`file://`, `memory://`, `gs://` (gcsfs), `s3://` (when s3fs is installed) and
any other fsspec URL, and it never imports TensorFlow or Keras. One concept per
module:

- `fs`: URLs to filesystems, paths, reads, listings, deletes and the errors
  (`StorageError` naming the URL, what failed and the fix).
- `atomic`: files that appear all at once (`atomic_write_bytes`,
  `atomic_upload`, `StagedFile`, `atomic_local_file`, JSON), write probes and
  the temp files a killed writer leaves.
- `manifest`: multi-file checkpoint directories committed by a manifest written
  last (`commit_checkpoint`, `read_manifest`, `is_committed`; `remove_committed`
  deletes them manifest first), and the
  "training finished" mark of a commit record (`finished_mark`,
  `training_finished`).
- `manager`: `CheckpointManager`, the commit protocol of a directory of
  checkpoints (commit point, pending marker, retention, ownership, leftovers),
  used by `ModelCheckpoint` and `BackupAndRestore`.
- `retention`: `Retention`, which checkpoints a manager keeps (best k, latest
  k, every N epochs / steps / hours), shared by `ModelCheckpoint` and
  `BackupAndRestore`.
- `snapshot`: `ModelSnapshot`, a Keras model's saved state in host memory,
  written to a file later (the asynchronous saves). The one module here that
  imports Keras and TensorFlow: it is not imported by `disttrain.storage`;
  import `disttrain.storage.snapshot` directly.
- `template`: `{run_id}` in destination templates.
- `scratch`: local scratch directories private to one run and worker.

Every name but `snapshot`'s is available from `disttrain.storage` directly.

Example:

>>> from disttrain import storage
>>> storage.write_json("memory://doc/init.json", {"epoch": 1})
>>> storage.read_json(storage.join("memory://doc", "init.json"))
{'epoch': 1}
"""

from disttrain.storage.atomic import (
    PROBE_PREFIX,
    StagedFile,
    atomic_local_file,
    atomic_upload,
    atomic_write_bytes,
    probe_writable,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from disttrain.storage.fs import (
    ENV_STORAGE_EMULATOR_HOST,
    exists,
    is_local,
    join,
    listdir,
    local_copy,
    read_bytes,
    remove,
    url_to_fs,
)
from disttrain.storage.manager import PENDING_NAME, CheckpointManager, check_max_to_keep
from disttrain.storage.manifest import (
    FINISHED_KEY,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    check_files,
    commit_checkpoint,
    describe_bytes,
    finished_mark,
    is_committed,
    read_manifest,
    remove_committed,
    training_finished,
)
from disttrain.storage.retention import Retention
from disttrain.storage.scratch import scratch, scratch_dir
from disttrain.storage.template import check_run_id_only, expand_run_id, template_fields

__all__ = [
    "ENV_STORAGE_EMULATOR_HOST",
    "FINISHED_KEY",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "PENDING_NAME",
    "PROBE_PREFIX",
    "Retention",
    "CheckpointManager",
    "StagedFile",
    "atomic_local_file",
    "atomic_upload",
    "atomic_write_bytes",
    "check_files",
    "check_max_to_keep",
    "check_run_id_only",
    "commit_checkpoint",
    "describe_bytes",
    "expand_run_id",
    "exists",
    "finished_mark",
    "is_committed",
    "is_local",
    "join",
    "listdir",
    "local_copy",
    "probe_writable",
    "read_bytes",
    "read_json",
    "read_manifest",
    "remove",
    "remove_committed",
    "remove_stale_temporaries",
    "scratch",
    "scratch_dir",
    "template_fields",
    "training_finished",
    "url_to_fs",
    "write_json",
]
