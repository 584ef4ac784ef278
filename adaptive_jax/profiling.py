"""Counting XLA compilations, to check that static shapes bound the number of programs."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

import jax

# Event that JAX records once per XLA backend compilation, with the function's name.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_active: list[collections.Counter] = []
_registered = False


def _listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if event != _BACKEND_COMPILE_EVENT:
        return
    name = kwargs.get("fun_name", "unknown")
    # JAX names jitted programs "jit(NAME)"; count them under the function's own name.
    if name.startswith("jit(") and name.endswith(")"):
        name = name[4:-1]
    with _lock:
        for counter in _active:
            counter[name] += 1


@contextlib.contextmanager
def count_compilations() -> Iterator[collections.Counter]:
    """Count XLA compilations by function name while the context is open.

    Yields a ``collections.Counter`` that fills as programs compile, for example
    ``{'train_step': 3, 'eval_step': 3}``. A call served from JAX's in-memory cache
    compiles nothing and is not counted.
    """
    global _registered
    counter: collections.Counter = collections.Counter()
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        _active.append(counter)
    try:
        yield counter
    finally:
        with _lock:
            _active.remove(counter)
