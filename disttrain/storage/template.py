"""Destination templates: the named fields of a path template, and `{run_id}` in directories.

A checkpoint directory may depend on the run only (`gs://bucket/{run_id}/ckpt`),
so every checkpoint of a run lands in one directory, found again by a restarted
attempt of the same run. File names may use more fields (`m-{epoch:03d}.keras`);
the callback that owns the file name fills those in.
"""

from __future__ import annotations

import string
from collections.abc import Collection

from disttrain.errors import StorageConfigError

RUN_ID_FIELD = "run_id"


def template_fields(template: str, owner: str, int_fields: Collection[str] = ()) -> set[str]:
    """The names of the fields of a `str.format` template, after checking its syntax.

    Args:
        template: e.g. `"gs://b/{run_id}/m-{epoch:03d}-{val_loss:.4f}.keras"`.
        owner: how error messages name the argument, e.g.
            `"ModelCheckpoint(filepath='m-{epoch}.keras')"`.
        int_fields: fields whose format spec is checked against an integer
            (the others against a float).

    Returns:
        The field names (`{val_loss:.4f}` gives `val_loss`).

    Raises:
        StorageConfigError: unbalanced braces, a positional field (`{}`) or a
            format spec the field's value cannot take.

    Example:

    >>> sorted(template_fields("{run_id}/m-{epoch:02d}.keras", "example", {"epoch"}))
    ['epoch', 'run_id']
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise StorageConfigError(
            f"{owner} is not a valid template: {e}. Fix: balance the braces, or double them "
            "('{{', '}}') for literal braces."
        ) from None
    fields = set()
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise StorageConfigError(
                f"{owner} has a positional field '{{}}'. "
                "Fix: name it, e.g. {epoch:02d} or {val_loss:.4f}."
            )
        name = field.split(".")[0].split("[")[0]
        try:
            format(1 if name in int_fields else 1.0, spec or "")
        except ValueError:
            raise StorageConfigError(
                f"{owner}: format spec {spec!r} of {{{field}}} is invalid. Fix: use a spec "
                "such as :02d for epoch or :.4f for metrics."
            ) from None
        fields.add(name)
    return fields


def check_run_id_only(template: str, owner: str, fix: str) -> None:
    """Raises unless `template` is a valid template whose only field is `{run_id}`.

    Args:
        template: a directory template, e.g. `"gs://bucket/{run_id}/backup"`.
        owner: how error messages name the argument, e.g.
            `"BackupAndRestore(backup_dir='x/{epoch}')"`.
        fix: what the message tells the user to do about other fields.

    Raises:
        StorageConfigError: a syntax error, or a field other than `{run_id}`.

    Example:

    >>> check_run_id_only("/tmp/{run_id}/backup", "example", "remove them")
    """
    bad = template_fields(template, owner) - {RUN_ID_FIELD}
    if bad:
        raise StorageConfigError(
            f"{owner}: the directory uses {sorted(bad)}; only {{run_id}} may appear there, so "
            f"every checkpoint of a run lands in one directory. Fix: {fix}."
        )


def expand_run_id(template: str, run_id: str, owner: str, fix: str) -> str:
    """Fills `{run_id}` into a directory template after `check_run_id_only`.

    Args:
        template: e.g. `"gs://bucket/{run_id}/backup"` (`{{`/`}}` are literal braces).
        run_id: the run id shared by every worker of the run.
        owner: how error messages name the argument.
        fix: what the message tells the user to do about other fields.

    Returns:
        The directory of this run.

    Raises:
        StorageConfigError: as `check_run_id_only`.

    Example:

    >>> expand_run_id("memory://ckpt/{run_id}", "run-7", "example", "remove them")
    'memory://ckpt/run-7'
    """
    check_run_id_only(template, owner, fix)
    return template.format(run_id=run_id)
