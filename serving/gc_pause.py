"""Pausing Python's cyclic garbage collector while a request builds millions of objects."""

from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_pauses = [0, False]  # pauses under way, whether the collector was on before the first


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off while any thread is inside this block."""
    # Millions of new objects (parsed JSON, a request's entries) would trigger one full collection
    # after another, each holding the GIL for up to a third of a second (and 3-6x the work), and
    # these objects have no cycles to collect.
    with _lock:
        if not _pauses[0]:
            _pauses[1] = gc.isenabled()
            gc.disable()
        _pauses[0] += 1
    try:
        yield
    finally:
        with _lock:
            _pauses[0] -= 1
            if not _pauses[0] and _pauses[1]:
                gc.enable()
