"""The register of every Keras and TensorFlow attribute disttrain replaces.

Every fix, check and recorder under `disttrain/keras_compat/` replaces Keras or
TensorFlow code only through `wrap`, which records the replacement (owner,
attribute, who made it, in which order) and refuses a second wrap of the same
attribute by the same module: calling an `install()` twice changes nothing. A
method wrapped by several modules is called outermost first, so the last wrap
of an attribute runs first. `disttrain.keras_compat.patches()` lists them in the
order they were made; docs/architecture.md shows the list of a full install.

Example:

```python
def wrap_fit(fit):
    @functools.wraps(fit)
    def fit_with_a_log(self, *args, **kwargs):
        print("fit starts")
        return fit(self, *args, **kwargs)

    return fit_with_a_log

_patch.wrap(detection.trainer_class(), "fit", wrap_fit, by=NAME)
```
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

_lock = threading.RLock()
_patches: list[Patch] = []


@dataclasses.dataclass(frozen=True, eq=False)
class Patch:
    """One replaced attribute.

    Attributes:
        owner: the class or module whose attribute was replaced.
        attr: the attribute's name.
        by: the name of the module that replaced it (a fix's `NAME`, or the check's).
        order: 0 for the first replacement made in this process, then 1, 2, ...
        original: what `owner.attr` was before (Keras's code, or an earlier wrap).
        replacement: what it is now, unless a later wrap replaced it again.
    """

    owner: Any
    attr: str
    by: str
    order: int
    original: Any
    replacement: Any

    @property
    def target(self) -> str:
        """`module.Class.attr` (or `module.attr`), e.g.
        `keras.src.callbacks.callback_list.CallbackList.on_epoch_end`."""
        return f"{qualified_name(self.owner)}.{self.attr}"


def wrap(owner: Any, attr: str, make_wrapper: Callable[[Any], Any], *, by: str) -> Any:
    """Replaces `owner.attr` with `make_wrapper(owner.attr)`, once per `by`, and records it.

    Args:
        owner: a Keras or TensorFlow class or module.
        attr: the attribute to replace (it may be inherited: the replacement is
            set on `owner` itself).
        make_wrapper: given the current attribute, returns its replacement (a
            wrapper that calls it, or code that replaces it outright). Called only
            when `by` has not wrapped `owner.attr` yet.
        by: who replaces it: the installing module's `NAME`.

    Returns:
        The replacement now in place (the earlier one when `by` had wrapped it).

    Raises:
        AttributeError: `owner` has no attribute `attr` (fixes check their
            targets in `is_needed()` first, so this means a bug in the fix).
    """
    with _lock:
        for patch in _patches:
            if patch.owner is owner and patch.attr == attr and patch.by == by:
                return patch.replacement
        original = getattr(owner, attr)
        replacement = make_wrapper(original)
        setattr(owner, attr, replacement)
        _patches.append(Patch(owner, attr, by, len(_patches), original, replacement))
        return replacement


def patches() -> tuple[Patch, ...]:
    """Every replacement made in this process, in the order made.

    Example:

    ```python
    for patch in disttrain.keras_compat.patches():
        print(patch.order, patch.target, patch.by)
    ```
    """
    with _lock:
        return tuple(_patches)


def installed(by: str) -> bool:
    """Whether the module named `by` has replaced anything in this process."""
    with _lock:
        return any(patch.by == by for patch in _patches)


def chain(owner: Any, attr: str) -> list[str]:
    """Who wraps `owner.attr`, outermost (called first) to innermost.

    Raises:
        LookupError: the chain is broken: the attribute in place is not the last
            registered replacement, or a replacement's original is not the one
            registered before it (something replaced it outside the register).
    """
    with _lock:
        mine = [patch for patch in _patches if patch.owner is owner and patch.attr == attr]
    current = getattr(owner, attr)
    names = []
    for patch in reversed(mine):
        if patch.replacement is not current:
            raise LookupError(f"{patch.target} was replaced outside the register "
                              f"(found {current!r} where {patch.by}'s wrapper should be)")
        names.append(patch.by)
        current = patch.original
    return names


def qualified_name(owner: Any) -> str:
    """`module.Class` of a class, `module` of a module."""
    if isinstance(owner, ModuleType):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


def table() -> str:
    """The register as a Markdown table: one row per replacement, in order (the table
    in docs/architecture.md is this, after a full install)."""
    rows = ["| order | replaced | by |", "| --- | --- | --- |"]
    rows += [f"| {p.order} | `{p.target}` | `{p.by}` |" for p in patches()]
    return "\n".join(rows)
