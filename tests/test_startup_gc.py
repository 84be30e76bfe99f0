"""The collector during start-up (server/main.py, issue 16): off while the initial
read of every domain runs, then everything start-up made frozen and the collector on
again; a process that manages the collector itself is left alone."""
from __future__ import annotations

import gc

from cim_provider.server import main


def _as_conftest_left_it() -> None:
    """Collector on, and what is alive frozen again (conftest freezes the process's
    holdings after collection; unfreezing them here would make every later full
    collection walk them)."""
    gc.enable()
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def test_off_during_startup_then_frozen_and_on():
    assert gc.isenabled()
    try:
        main._STARTUP_GC = main.begin_startup_collection()
        assert main._STARTUP_GC and not gc.isenabled()
        made = [[i] for i in range(1000)]          # what start-up builds
        tracked = {id(o) for o in gc.get_objects()}
        assert all(id(m) in tracked for m in made)
        main.end_startup_collection()
        assert gc.isenabled() and not main._STARTUP_GC
        # Frozen: in the permanent generation, which get_objects() does not list.
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(m) in tracked for m in made)
    finally:
        _as_conftest_left_it()


def test_left_alone_when_already_off():
    gc.disable()
    try:
        main._STARTUP_GC = main.begin_startup_collection()
        assert main._STARTUP_GC is False and not gc.isenabled()
        main.end_startup_collection()
        assert not gc.isenabled()
    finally:
        _as_conftest_left_it()
