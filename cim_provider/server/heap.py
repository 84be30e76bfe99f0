"""Freed heap given back to the system (glibc's malloc_trim), after start-up and after
each usage sample.

The C heap keeps what libvirt frees: with the test driver inside the server (the
benchmark's in-process configuration, docs/architecture.md "Sources") opening a node
of 10,000 domains leaves ~30 MiB of freed libxml2 trees in the heap, 3 KiB per
domain that the process's RSS would carry for ever; each usage sample (one
listing and its statistics in libvirt call threads) leaves a little more. malloc_trim hands
the free pages back: ~2 ms once at start-up, well under a millisecond after a sample,
run in a worker thread. Elsewhere than glibc (musl has no malloc_trim) this does
nothing.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

_TRIM: Any = None
_LOADED = False


def _malloc_trim() -> Any:
    global _TRIM, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            fn = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            log.debug("no malloc_trim in this C library: freed heap stays with the process")
        else:
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _TRIM = fn
    return _TRIM


def trim() -> bool:
    """Give the heap's free pages back to the system; True when memory was returned."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
