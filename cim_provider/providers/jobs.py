"""Long operations as jobs: VIRT_ConcreteJob, VIRT_AffectedJobElement (job -> system)
and VIRT_OwningJobElement (management service -> job). docs/architecture.md, "Jobs".

A method that acts (RequestStateChange) runs its work as a task and waits up to
`sync_wait` seconds: done by then, it answers as it always did (0, or the error);
otherwise it answers 4096 "Job Started" with a `Job` reference, and the task goes on.
The work ends on evidence (libvirt's state, its events, the Manager's answer), never
only on a call returning, and a source call that timed out is still followed; its
outcome is the job's JobState (7 Completed, 10 Exception with ErrorDescription).

Jobs live in memory: a server restart forgets them. A finished job is removed
TimeBeforeRemoval (5 minutes) after it ended (DeleteOnCompletion is false, so a client
can read the outcome first). Every change of a job goes to `Jobs.listeners` (the server
publishes them as CIM_InstModification indications).
"""
from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pywbem
from pywbem import CIMDateTime, CIMError, CIMInstance, CIMInstanceName

from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import VIRT_NS, Backend, make

log = logging.getLogger(__name__)

JOB_CLASS = "VIRT_ConcreteJob"
AJE_CLASS = "VIRT_AffectedJobElement"
OJE_CLASS = "VIRT_OwningJobElement"
JOB_PREFIX = "VIRT:job:"
RC_JOB_STARTED = 4096
REMOVAL = 300.0                  # TimeBeforeRemoval, seconds

# CIM_ConcreteJob.JobState
RUNNING, COMPLETED, TERMINATED, KILLED, EXCEPTION = 4, 7, 8, 9, 10
_FINISHED = (COMPLETED, TERMINATED, KILLED, EXCEPTION)
_STATUS = {RUNNING: "running", COMPLETED: "completed", TERMINATED: "terminated",
           KILLED: "killed", EXCEPTION: "failed"}


@dataclass(eq=False)
class Job:
    """One job; times are wall-clock seconds (time.time())."""
    number: int
    method: str                      # "RequestStateChange"
    uuid: str                        # the system acted on
    title: str                       # "RequestStateChange(4) of web"
    submitted: float = field(default_factory=time.time)
    state: int = RUNNING
    changed: float = 0.0
    finished: float | None = None
    error_code: int | None = None    # a CIM status code
    error: str | None = None
    version: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    raised: BaseException | None = field(default=None, repr=False)

    @property
    def instance_id(self) -> str:
        return f"{JOB_PREFIX}{self.number}"


def job_path(instance_id: str) -> CIMInstanceName:
    return CIMInstanceName(JOB_CLASS, {"InstanceID": instance_id}, namespace=VIRT_NS)


def _stamp(when: float | None) -> CIMDateTime | None:
    if when is None:
        return None
    return CIMDateTime(datetime.datetime.fromtimestamp(when, datetime.timezone.utc))


def _interval(seconds: float) -> CIMDateTime:
    return CIMDateTime(datetime.timedelta(seconds=max(0, int(seconds))))


class Jobs:
    """The jobs of one server, by InstanceID."""

    def __init__(self, *, sync_wait: float = 2.0, removal: float = REMOVAL) -> None:
        self.sync_wait = sync_wait
        self.removal = removal
        self._jobs: dict[str, Job] = {}
        self._numbers = itertools.count(1)
        # Called with (job, previous JobState or None) after each change of a job
        # that clients can see.
        self.listeners: list[Callable[[Job, int | None], None]] = []

    def get(self, instance_id: object) -> Job | None:
        return self._jobs.get(instance_id) if isinstance(instance_id, str) else None

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    async def run(self, method: str, uuid: str, title: str,
                  work: Coroutine[Any, Any, None]) -> Job | None:
        """Run `work`; None when it ended within `sync_wait` (its error, if any, is
        raised here as it was raised there), else the job that follows it."""
        job = Job(next(self._numbers), method, uuid, title)
        job.changed = job.submitted
        job.task = asyncio.ensure_future(self._follow(job, work))
        try:
            done, _ = await asyncio.wait({job.task}, timeout=self.sync_wait)
        except asyncio.CancelledError:
            # The request went away (the client hung up): the work goes on, as a job
            # any client can find.
            if not job.task.done():
                self._jobs[job.instance_id] = job
                self._notify(job, None)
            raise
        if done:
            if job.raised is not None:
                raise job.raised
            return None
        self._jobs[job.instance_id] = job
        log.info("job %s started: %s", job.instance_id, title)
        self._notify(job, None)
        return job

    async def _follow(self, job: Job, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except CIMError as exc:
            job.raised = exc
            self._finish(job, EXCEPTION, exc.status_code, exc.status_description)
        except asyncio.CancelledError:
            self._finish(job, KILLED, pywbem.CIM_ERR_FAILED, "the server stopped")
            raise
        except Exception as exc:        # a job must end, whatever went wrong
            log.exception("job %s failed", job.instance_id)
            job.raised = CIMError(pywbem.CIM_ERR_FAILED, f"internal error: {exc}")
            self._finish(job, EXCEPTION, pywbem.CIM_ERR_FAILED, f"internal error: {exc}")
        else:
            self._finish(job, COMPLETED, None, None)

    def _finish(self, job: Job, state: int, code: int | None, error: str | None) -> None:
        previous = job.state
        job.state, job.error_code, job.error = state, code, error
        job.finished = job.changed = time.time()
        job.version += 1
        if job.instance_id in self._jobs:
            log.info("job %s %s%s", job.instance_id, _STATUS[state],
                     f": {error}" if error else "")
            self._notify(job, previous)
            try:
                asyncio.get_running_loop().call_later(self.removal, self._remove, job)
            except RuntimeError:
                self._remove(job)

    def _remove(self, job: Job) -> None:
        if self._jobs.get(job.instance_id) is job:
            del self._jobs[job.instance_id]

    def _notify(self, job: Job, previous: int | None) -> None:
        for listener in tuple(self.listeners):
            try:
                listener(job, previous)
            except Exception:
                log.exception("job listener failed on %s", job.instance_id)

    async def close(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def job_values(job: Job, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    end = job.finished if job.finished is not None else now
    ok = job.state in (RUNNING, COMPLETED)
    return {
        "InstanceID": job.instance_id, "Name": job.method,
        "ElementName": job.title, "Caption": job.title,
        "JobState": job.state, "JobStatus": _STATUS[job.state],
        "OperationalStatus": [2] if job.state == RUNNING else ([17, 2] if ok else [17, 6]),
        "PercentComplete": 100 if job.state == COMPLETED else None,
        "TimeSubmitted": _stamp(job.submitted), "StartTime": _stamp(job.submitted),
        "TimeOfLastStateChange": _stamp(job.changed),
        "ElapsedTime": _interval(end - job.submitted),
        "ErrorCode": job.error_code if job.error_code is not None
        else (0 if job.state == COMPLETED else None),
        "ErrorDescription": job.error,
        "DeleteOnCompletion": False, "TimeBeforeRemoval": _interval(REMOVAL),
        "LocalOrUtcTime": 2,
    }


class JobsProvider(Provider):
    """VIRT_ConcreteJob: enumerate, get, RequestStateChange (Kill/Terminate), GetError."""
    namespace = VIRT_NS
    classnames = (JOB_CLASS,)

    def __init__(self, backend: Backend, jobs: Jobs) -> None:
        self.b = backend
        self.jobs = jobs

    def instance(self, job: Job) -> CIMInstance:
        return make(self.b, JOB_CLASS, job_values(job), job_path(job.instance_id))

    async def close(self) -> None:
        await self.jobs.close()

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self.instance(j) for j in self.jobs.all()]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        job = self.jobs.get(path.keybindings.get("InstanceID"))
        if job is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no job {path.keybindings.get('InstanceID')!r}"
                           " (a finished job is removed 5 minutes after it ended)")
        return self.instance(job)

    async def invoke_method(self, target: Any, method: str,
                            params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        if not isinstance(target, CIMInstanceName):
            return await super().invoke_method(target, method, params)
        job = self.jobs.get(target.keybindings.get("InstanceID"))
        if job is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, "no such job")
        if method == "GetError":
            return 0, {"Error": self.error_instance(job)}
        if method == "RequestStateChange":
            requested = params.get("RequestedState")
            if requested is None:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "RequestedState is required")
            if int(requested) not in (2, 3, 4, 5, 6) and not 32768 <= int(requested) <= 65535:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"RequestedState {requested} is not a value of its ValueMap")
            if job.state in _FINISHED:
                return 4097, {}          # Invalid State Transition: it has ended
            # Kill/Terminate: libvirt cannot take back a state change it has been asked
            # for (a shutdown request is with the guest, a start with the Manager), and
            # nothing else is offered: Not Supported.
            return 1, {}
        return await super().invoke_method(target, method, params)

    def error_instance(self, job: Job) -> CIMInstance | None:
        """The job's error as an embedded CIM_Error (None while it has none)."""
        if job.state != EXCEPTION:
            return None
        cls = self.b.cls("CIM_Error")
        inst = CIMInstance("CIM_Error")
        values = {"ErrorType": 4, "OtherErrorType": None, "OwningEntity": "cim-provider",
                  "MessageID": f"{job.method}.failed", "Message": job.error or "",
                  "PerceivedSeverity": 4, "ProbableCause": 0,
                  "CIMStatusCode": job.error_code or pywbem.CIM_ERR_FAILED,
                  "CIMStatusCodeDescription": job.error or "",
                  "ErrorSource": str(job_path(job.instance_id)), "ErrorSourceFormat": 2}
        for name, value in values.items():
            if value is None or name not in cls.properties:
                continue
            prop = cls.properties[name]
            inst[name] = pywbem.CIMProperty(name, value, type=prop.type, is_array=prop.is_array)
        return inst


class JobAssociationsProvider(AssociationProvider):
    """AffectedJobElement (AffectedElement = system, AffectingElement = job) and
    OwningJobElement (OwningElement = management service, OwnedElement = job)."""
    namespace = VIRT_NS
    classnames = (AJE_CLASS, OJE_CLASS)

    def __init__(self, backend: Backend, jobs: Jobs) -> None:
        self.b = backend
        self.jobs = jobs

    def _assoc(self, cls: str, job: Job) -> CIMInstance:
        from .computer_system import system_path
        jp = job_path(job.instance_id)
        if cls == AJE_CLASS:
            keys = {"AffectedElement": system_path(job.uuid), "AffectingElement": jp}
            extra: dict[str, Any] = {"ElementEffects": [0]}
        else:
            keys = {"OwningElement": self.b.vsms_path(), "OwnedElement": jp}
            extra = {}
        return make(self.b, cls, {**keys, **extra}, CIMInstanceName(cls, keys, namespace=VIRT_NS))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = AJE_CLASS if classname.lower() == AJE_CLASS.lower() else OJE_CLASS
        return [self._assoc(cls, j) for j in self.jobs.all()]

    async def references(self, classname: str,
                         source: CIMInstanceName) -> Iterable[CIMInstance]:
        if source is None:
            return []
        key = path_key(source, VIRT_NS)
        out = []
        for inst in await self.enumerate_instances(classname):
            if any(p.type == "reference" and p.value is not None
                   and path_key(p.value, VIRT_NS) == key for p in inst.properties.values()):
                out.append(inst)
        return out


# ---- following a state change to its evidence ------------------------------------------

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
