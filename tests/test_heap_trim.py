"""server/heap.py (issue 16): the C heap's free pages go back to the system, where the
C library can (glibc's malloc_trim), and nothing happens where it cannot."""
from __future__ import annotations

import ctypes

from cim_provider.server import heap


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_trim_gives_freed_heap_back():
    if heap._malloc_trim() is None:
        assert heap.trim() is False
        return
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # many small blocks (below the mmap threshold: they stay in the heap once freed)
    blocks = [libc.malloc(1000) for _ in range(40_000)]
    for b in blocks:
        ctypes.memset(b, 1, 1000)
    for b in blocks:
        libc.free(b)
    before = _rss_kib()
    heap.trim()
    assert _rss_kib() < before


def test_without_malloc_trim_nothing_happens(monkeypatch):
    monkeypatch.setattr(heap, "_TRIM", None)
    monkeypatch.setattr(heap, "_LOADED", True)
    assert heap.trim() is False
