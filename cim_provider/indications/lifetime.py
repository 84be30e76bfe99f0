"""How long a subscription lives and what a client may change of it (DSP1054).

SubscriptionDuration (seconds; null: for ever) counts from SubscriptionStartTime: a
subscription expires then, is sent nothing after it and is deleted (CIM_Abstract-
IndicationSubscription: "Indications generated after the duration ... MUST NOT be
sent. An expired subscription MAY be deleted and MUST NOT be modified").
SubscriptionTimeRemaining is computed when the subscription is read.

ModifyInstance of a subscription changes SubscriptionState (2 Enabled, 4 Disabled;
TimeOfLastStateChange follows) and SubscriptionDuration (the expiry moves with it;
one already past makes the subscription expire now). Other properties are refused
with CIM_ERR_NOT_SUPPORTED unless they are given unchanged or are computed ones.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pywbem
from pywbem import CIMDateTime, CIMError, CIMInstance, CIMProperty

log = logging.getLogger(__name__)

STATE_ENABLED, STATE_DISABLED = 2, 4
WRITABLE = ("SubscriptionState", "SubscriptionDuration")
# Read from the server, not written by a client: ignored in a ModifiedInstance.
COMPUTED = ("SubscriptionTimeRemaining", "SubscriptionStartTime", "TimeOfLastStateChange",
            "Filter", "Handler", "LastIndicationIdentifier",
            "LastIndicationProductionDateTime")


def expires_at(sub: CIMInstance) -> float | None:
    """The wall-clock time a subscription expires; None when it does not."""
    duration = sub.get("SubscriptionDuration")
    start = sub.get("SubscriptionStartTime")
    if duration is None or start is None:
        return None
    if not isinstance(start, CIMDateTime):
        start = CIMDateTime(start)
    return start.datetime.timestamp() + int(duration)


def expired(sub: CIMInstance, now: float | None = None) -> bool:
    end = expires_at(sub)
    return end is not None and (time.time() if now is None else now) >= end


def check_duration(value: Any) -> None:
    if value is not None and int(value) < 1:
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                       "SubscriptionDuration must be at least 1 (seconds), or null for a "
                       "subscription that does not expire")


def shown(sub: CIMInstance, now: float | None = None) -> CIMInstance:
    """The subscription as a client reads it: with SubscriptionTimeRemaining."""
    end = expires_at(sub)
    if end is None:
        return sub
    out = sub.copy()
    left = max(0, int(end - (time.time() if now is None else now)))
    out["SubscriptionTimeRemaining"] = CIMProperty("SubscriptionTimeRemaining",
                                                   pywbem.Uint64(left), type="uint64")
    return out


def modified(stored: CIMInstance, new: CIMInstance, property_list: list[str] | None
             ) -> CIMInstance:
    """The stored subscription with what ModifyInstance may change applied (a copy)."""
    if expired(stored):
        raise CIMError(pywbem.CIM_ERR_FAILED, "the subscription has expired; it cannot be "
                       "modified (it is being deleted)")
    names = [p for p in new.properties] if property_list is None else list(property_list)
    out = stored.copy()
    for name in names:
        canon = next((w for w in WRITABLE if w.lower() == name.lower()), None)
        value = new.get(name)
        if canon is None:
            if any(c.lower() == name.lower() for c in COMPUTED) or value == stored.get(name):
                continue
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           f"{name} of a subscription cannot be modified; "
                           f"{' and '.join(WRITABLE)} can")
        if canon == "SubscriptionState":
            if value not in (STATE_ENABLED, STATE_DISABLED):
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               "SubscriptionState must be 2 (Enabled) or 4 (Disabled)")
            if value != stored.get("SubscriptionState", STATE_ENABLED):
                out["TimeOfLastStateChange"] = CIMProperty(
                    "TimeOfLastStateChange", CIMDateTime.now(), type="datetime")
            out["SubscriptionState"] = CIMProperty("SubscriptionState", pywbem.Uint16(value),
                                                   type="uint16")
        else:
            check_duration(value)
            out["SubscriptionDuration"] = CIMProperty(
                "SubscriptionDuration", None if value is None else pywbem.Uint64(value),
                type="uint64")
    return out


class Expiry:
    """Deletes subscriptions when they expire: one timer, for the next expiry."""

    def __init__(self, subscriptions: dict[tuple, CIMInstance],
                 delete: Callable[[Any], Awaitable[None]]) -> None:
        self.subscriptions = subscriptions           # the live table (Subscriptions')
        self.delete = delete
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self) -> None:
        """Wake up when the next subscription expires (after any change)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ends = [e for e in map(expires_at, self.subscriptions.values()) if e is not None]
        if not ends:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:       # loaded outside a loop: the first change schedules
            return
        self._timer = loop.call_later(max(0.0, min(ends) - time.time()) + 0.01, self._fire)

    def _fire(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._delete_expired())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_expired(self) -> None:
        for key, sub in list(self.subscriptions.items()):
            if expired(sub) and key in self.subscriptions:
                try:
                    await self.delete(sub.path)
                    log.info("subscription %s expired (SubscriptionDuration %s s)",
                             sub.path, sub.get("SubscriptionDuration"))
                except CIMError as exc:
                    log.warning("could not delete expired subscription %s: %s", sub.path, exc)
        self.schedule()
