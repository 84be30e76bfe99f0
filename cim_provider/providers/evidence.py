"""Following a state change to its evidence: RequestStateChange's work (and so its job,
providers/jobs.py) ends when the inventory shows the state reached, never only on a
call returning. docs/architecture.md, "Jobs".
"""
from __future__ import annotations

import asyncio
from typing import Any

import pywbem
from pywbem import CIMError

from .backend import Backend

_VERBS = {2: "start", 3: "stop", 4: "shut down", 9: "pause", 10: "reboot", 11: "reset"}


async def follow_state(backend: Backend, uuid: str, requested: int, *, timeout: float,
                       from_passive: bool = False, reboots_before: int = 0) -> None:
    """Return once the inventory shows `requested` reached on `uuid`; CIM_ERR_FAILED when
    libvirt reports the start failed, or when nothing shows within `timeout` seconds
    ("the guest did not shut down within 300 s"). Waits on the inventory's change
    feed (and re-checks twice a second for counters that are not records)."""
    from ..domain.records import RunState
    rec0 = backend.inventory.get(uuid)
    old_reason = rec0.stop_reason if rec0 is not None else None
    cleared = old_reason is None

    def check() -> bool | str:
        nonlocal cleared
        rec = backend.inventory.get(uuid)
        run = rec.running if rec is not None else None
        if requested in (3, 4):
            return run is None or run.state is RunState.SHUTOFF
        if requested == 9:
            return run is not None and run.state is RunState.PAUSED
        if requested == 2:
            if run is not None and run.state in (RunState.RUNNING, RunState.BLOCKED):
                return True
            reason = rec.stop_reason if rec is not None else None
            if reason is None:
                cleared = True
            elif from_passive and cleared:
                return reason
            return False
        if requested == 10:
            if run is None:
                return False
            src = backend.libvirt
            # libvirt's test driver reboots at once and raises no event for it.
            return run.config.type == "Test" or (
                src is not None and src.reboots(uuid) > reboots_before)
        return True

    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_change(change: Any) -> None:
        if change.uuid == uuid:
            changed.set()
    unsubscribe = backend.inventory.subscribe(on_change)
    try:
        deadline = loop.time() + timeout
        while True:
            outcome = check()
            if outcome is True:
                return
            if isinstance(outcome, str):
                raise CIMError(pywbem.CIM_ERR_FAILED, f"the start failed: {outcome}")
            left = deadline - loop.time()
            if left <= 0:
                raise CIMError(pywbem.CIM_ERR_FAILED, f"the guest did not "
                               f"{_VERBS.get(requested, 'change state')} within {timeout:g} s")
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
    finally:
        unsubscribe()
