"""Pausing Python's cyclic garbage collector around bulk IR work.

An IR model is a large graph of small objects with reference cycles (a node
holds its output values, each value points back at its producer). CPython's
cyclic collector walks every live container object on each full (generation 2)
collection, and building or rewriting a model triggers such collections
repeatedly: measured on a 100k-node model, a compile spent 5.1 s of 20 s in
generation-2 collections, and the share grows with model size. Import, export
and the rewriter allocate and free in bulk, so they run with the collector
paused; what they leave unreachable is reclaimed by reference counting, or by
the first collection after the block (the IR's own cycles).
"""
from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """Disable the cyclic garbage collector inside the ``with`` block.

    Re-entrant and thread-safe: the collector is re-enabled when the outermost
    block exits, and only if it was enabled when that block was entered (a
    caller that disabled it keeps it disabled).
    """
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
