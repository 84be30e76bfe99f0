"""The reference Manager's start policy: refuse what does not fit, or make room.

`cim-provider manager --overcommit refuse|make-room` (default refuse).

- refuse (today's rule): a start needs its memory (`MemoryKiB`, else `MaxMemoryKiB`,
  else 128 MiB) free, where free is the host's memory minus the current memory of
  every running domain, paused ones included.
- make-room: a paused domain's memory is not touched until it resumes, so the host
  may page it out: up to `--pause-budget-kib` (default: this machine's swap) of
  paused memory counts as free. When a start does not fit, the Manager, in this
  order, (1) starts the domain with less memory, down to its `MinMemoryKiB`, (2)
  pauses, then (3) managed-saves (virDomainManagedSave: the guest's state goes to
  disk and comes back intact at the next start) running domains of strictly lower
  `Priority`, the fewest domains possible (the largest first), and only when that
  is enough; otherwise nothing is touched and the start is refused with what it
  needs, what is free and what could be freed. Domains the Manager did not start
  are touched only with `--overcommit-others`; farm definitions are paused, never
  saved (a saved guest would be offered on every host). Equal priorities are never
  displaced; an unset Priority is 0.

The plan is a pure function (`plan_start`); `displace` / `undo` carry it out on a
libvirt connection (blocking, called off the event loop).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

log = logging.getLogger(__name__)

REFUSE, MAKE_ROOM = "refuse", "make-room"
MODES = (REFUSE, MAKE_ROOM)
SHRUNK, PAUSED, SAVED = "shrunk", "paused", "saved"


def size_text(kib: int) -> str:
    """Memory in a form a person reads at a glance, with the exact KiB beside it."""
    for unit, factor in (("TiB", 1024 ** 3), ("GiB", 1024 ** 2), ("MiB", 1024)):
        if kib >= factor:
            return f"{kib / factor:.1f} {unit} ({kib} KiB)"
    return f"{kib} KiB"


def swap_kib(path: str = "/proc/meminfo") -> int:
    """SwapTotal of this machine in KiB (0 when it cannot be read)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                m = re.match(r"SwapTotal:\s+(\d+)\s*kB", line)
                if m:
                    return int(m.group(1))
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    overcommit: str = REFUSE
    others: bool = False                    # may touch domains the Manager did not start
    host_memory_kib: int | None = None      # instead of virNodeGetInfo (tests, cgroups)
    pause_budget_kib: int | None = None     # None: this machine's swap

    def __post_init__(self) -> None:
        if self.overcommit not in MODES:
            raise ValueError(f"--overcommit {self.overcommit!r}: use refuse or make-room")
        for name, v in (("--host-memory-kib", self.host_memory_kib),
                        ("--pause-budget-kib", self.pause_budget_kib)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must not be negative")

    def budget(self) -> int:
        return swap_kib() if self.pause_budget_kib is None else self.pause_budget_kib


@dataclass(frozen=True, slots=True)
class Running:
    """A running domain as the policy sees it."""
    uuid: str
    name: str
    memory_kib: int
    paused: bool = False
    priority: int = 0
    movable: bool = False        # the policy may pause it (started by the Manager, or
                                 # --overcommit-others)
    savable: bool = False        # ... and managed-save it


@dataclass(frozen=True, slots=True)
class Action:
    uuid: str
    name: str
    action: str                  # shrunk | paused | saved
    memory_kib: int              # shrunk: what it starts with; else what it held
    priority: int = 0
    requested_kib: int | None = None     # shrunk: what it asked for

    def values(self) -> dict[str, Any]:
        """For the DomainsDisplaced signal (plain values; the service types them)."""
        out: dict[str, Any] = {"UUID": self.uuid, "Name": self.name, "Action": self.action,
                               "MemoryKiB": self.memory_kib, "Priority": self.priority}
        if self.requested_kib is not None:
            out["RequestedMemoryKiB"] = self.requested_kib
        return out

    def text(self) -> str:
        if self.action == SHRUNK:
            return (f"started {self.name} with {size_text(self.memory_kib)} instead of "
                    f"{size_text(self.requested_kib or 0)}")
        return f"{self.action} {self.name} ({self.uuid}, {size_text(self.memory_kib)}, " \
               f"priority {self.priority})"


@dataclass(frozen=True, slots=True)
class Plan:
    memory_kib: int                      # what the domain starts with
    actions: tuple[Action, ...] = ()

    @property
    def displaced(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.action != SHRUNK)


class Refusal(Exception):
    """The start does not fit and nothing may be done about it; the message says why."""


def _fewest(candidates: Sequence[Running], need: int, cap: int) -> list[Running] | None:
    """The fewest candidates (largest first) whose pausing frees `need`, when pausing
    frees at most `cap` in all; None when they cannot."""
    if need <= 0:
        return []
    if cap < need:
        return None
    chosen: list[Running] = []
    total = 0
    for r in candidates:
        chosen.append(r)
        total += r.memory_kib
        if min(total, cap) >= need:
            return chosen
    return None


def plan_start(*, name: str, uuid: str, needed: int, minimum: int | None, priority: int,
               host_kib: int, running: Sequence[Running], options: PolicyOptions) -> Plan:
    """What to do to start `name` needing `needed` KiB (at least `minimum`), or Refusal."""
    used_all = sum(r.memory_kib for r in running)
    if options.overcommit != MAKE_ROOM:
        free = max(host_kib - used_all, 0)
        if needed <= free:
            return Plan(needed)
        raise Refusal(f"starting {name} needs {size_text(needed)} of memory but only "
                      f"{size_text(free)} is free (host {size_text(host_kib)}, running "
                      f"domains use {size_text(used_all)})")
    budget = options.budget()
    active = sum(r.memory_kib for r in running if not r.paused)
    paused = used_all - active
    used = active + max(0, paused - budget)
    free = max(host_kib - used, 0)
    if needed <= free:
        return Plan(needed)
    floor = minimum if minimum and minimum < needed else needed

    def shrink(kib: int) -> tuple[Action, ...]:
        if kib >= needed:
            return ()
        return (Action(uuid, name, SHRUNK, kib, priority, needed),)
    if floor <= free:
        return Plan(free, shrink(free))
    deficit = floor - free
    left = max(0, budget - paused)           # paused memory that may still be paged out
    candidates = sorted((r for r in running if not r.paused and r.movable
                         and r.priority < priority),
                        key=lambda r: (-r.memory_kib, r.priority, r.name, r.uuid))
    saves: list[Running] = []
    pauses = _fewest(candidates, deficit, left)
    if pauses is None:
        savable = [r for r in candidates if r.savable]
        for n in range(1, len(savable) + 1):
            saves = savable[:n]
            rest = [r for r in candidates if r not in saves]
            pauses = _fewest(rest, deficit - sum(r.memory_kib for r in saves), left)
            if pauses is not None:
                break
    if pauses is None:
        savable_kib = sum(r.memory_kib for r in candidates if r.savable)
        pausable_kib = min(sum(r.memory_kib for r in candidates if not r.savable), left)
        names = ", ".join(r.name for r in candidates[:8]) + (", ..." if len(candidates) > 8
                                                             else "")
        at_least = f" (at least {size_text(floor)})" if floor < needed else ""
        raise Refusal(
            f"starting {name} needs {size_text(needed)}{at_least} of memory but only "
            f"{size_text(free)} is free (host {size_text(host_kib)}, running domains use "
            f"{size_text(active)}, paused ones {size_text(paused)} of which "
            f"{size_text(min(paused, budget))} may be paged out); making room could free "
            f"at most {size_text(savable_kib + pausable_kib)} from the "
            f"{len(candidates)} running domains with a priority below {priority}"
            + (f" ({names})" if candidates else "") + "; nothing was touched")
    gained = sum(r.memory_kib for r in saves) + min(sum(r.memory_kib for r in pauses), left)
    start = min(needed, free + gained)
    actions = shrink(start) \
        + tuple(Action(r.uuid, r.name, PAUSED, r.memory_kib, r.priority) for r in pauses) \
        + tuple(Action(r.uuid, r.name, SAVED, r.memory_kib, r.priority) for r in saves)
    return Plan(start, actions)


# ---------------------------------------------------------------- carrying it out

@dataclass(frozen=True, slots=True)
class Done:
    action: Action
    made_persistent: bool = False        # saved: we defined it in libvirt to save it


def displace(conn: libvirt.virConnect, plan: Plan) -> list[Done]:
    """Pause, then save, what the plan says (blocking). A failure undoes what was
    done and raises libvirt's error."""
    done: list[Done] = []
    try:
        for a in sorted(plan.displaced, key=lambda a: a.action != PAUSED):
            dom = conn.lookupByUUIDString(a.uuid)
            if a.action == PAUSED:
                dom.suspend()
                done.append(Done(a))
            else:
                made = False
                if not dom.isPersistent():
                    # managedSave needs a persistent domain: give the transient one a
                    # libvirt definition for as long as it is saved
                    conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
                    made = True
                try:
                    dom.managedSave(0)
                except libvirt.libvirtError:
                    if made:
                        _quietly(dom.undefine)
                    raise
                done.append(Done(a, made))
            log.info("making room: %s", a.text())
    except libvirt.libvirtError:
        undo(conn, done)
        raise
    return done


def undo(conn: libvirt.virConnect, done: Sequence[Done]) -> None:
    """Put back what `displace` did (blocking; each step best effort, logged)."""
    for d in reversed(done):
        try:
            dom = conn.lookupByUUIDString(d.action.uuid)
            if d.action.action == PAUSED:
                dom.resume()
            else:
                dom.create()                     # restores the managed save
                if d.made_persistent:
                    dom.undefine()
            log.info("undid: %s", d.action.text())
        except libvirt.libvirtError as exc:
            log.error("could not undo %s: %s", d.action.text(), exc.get_error_message() or exc)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except libvirt.libvirtError:
        pass


def with_current_memory(xml: str, kib: int) -> str:
    """Domain XML with <currentMemory> set to `kib` (the maximum, <memory>, stays)."""
    element = f"<currentMemory unit='KiB'>{int(kib)}</currentMemory>"
    new, n = re.subn(r"<currentMemory\b[^>]*>[^<]*</currentMemory>", element, xml, count=1)
    if n:
        return new
    new, n = re.subn(r"(</memory>)", r"\1" + element, xml, count=1)
    return new if n else xml


__all__ = ["PolicyOptions", "Running", "Action", "Plan", "Refusal", "Done", "plan_start",
           "displace", "undo", "with_current_memory", "size_text", "swap_kib", "REFUSE",
           "MAKE_ROOM", "MODES", "SHRUNK", "PAUSED", "SAVED"]
