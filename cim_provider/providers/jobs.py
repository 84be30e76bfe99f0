"""Long operations as jobs: VIRT_ConcreteJob, VIRT_AffectedJobElement (job -> system)
and VIRT_OwningJobElement (management service -> job). docs/architecture.md, "Jobs".

A method that acts (RequestStateChange, and the management service's DefineSystem,
DestroySystem, ModifySystemSettings, Add/Modify/RemoveResourceSettings) runs its work as
a task and waits up to `sync_wait` seconds: done by then, it answers as it always did
(0 with its output parameters, or the error); otherwise it answers 4096 "Job Started"
with a `Job` reference, and the task goes on.
The work ends on evidence (libvirt's state, its events, the Manager's answer), never
only on a call returning, and a source call that timed out is still followed; its
outcome is the job's JobState (7 Completed, 10 Exception with ErrorDescription).

A client may stop a job (RequestStateChange 4 Terminate / 5 Kill) where the work can
really be stopped: while it waits for evidence (`phase` "evidence"), or while it is in
a libvirt call under which libvirt runs an abortable job of its own (save, dump,
migration: `phase` "libvirt" with an `abort` hook). The work is cancelled and the job
ends Terminated (8) or Killed (9). A call to the Manager cannot be taken back: Not
Supported (1). docs/architecture.md, "Jobs", has the table of answers.

Jobs live in memory: a server restart forgets them. A finished job is removed
TimeBeforeRemoval (5 minutes) after it ended (DeleteOnCompletion is false, so a client
can read the outcome first). Every change of a job goes to `Jobs.listeners` (the server
publishes them as CIM_InstModification indications).
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pywbem
from pywbem import CIMDateTime, CIMError, CIMInstance, CIMInstanceName

from ..domain.sources import RunningSource, SourceError
from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import VIRT_NS, Backend, make

log = logging.getLogger(__name__)

JOB_CLASS = "VIRT_ConcreteJob"
AJE_CLASS = "VIRT_AffectedJobElement"
OJE_CLASS = "VIRT_OwningJobElement"
JOB_PREFIX = "VIRT:job:"
RC_JOB_STARTED = 4096
# CIM_ConcreteJob.RequestStateChange return codes
RC_OK, RC_NOT_SUPPORTED, RC_INVALID_PARAMETER, RC_ENDED, RC_TIMEOUT_NOT_SUPPORTED = \
    0, 1, 5, 4097, 4098
TERMINATE, KILL = 4, 5
REMOVAL = 300.0                  # TimeBeforeRemoval, seconds

# CIM_ConcreteJob.JobState
RUNNING, COMPLETED, TERMINATED, KILLED, EXCEPTION = 4, 7, 8, 9, 10
_FINISHED = (COMPLETED, TERMINATED, KILLED, EXCEPTION)
_STATUS = {RUNNING: "running", COMPLETED: "completed", TERMINATED: "terminated",
           KILLED: "killed", EXCEPTION: "failed"}


# What a job's work is doing now (Job.phase): only "evidence" and "libvirt" (with an
# abort hook) can be stopped by a client.
CALL, MANAGER, LIBVIRT, EVIDENCE = "call", "manager", "libvirt", "evidence"
_PHASE_TEXT = {CALL: "running", MANAGER: "waiting for the Manager",
               LIBVIRT: "waiting for libvirt", EVIDENCE: "waiting for the system to show "
               "the change"}


class MethodReturn(Exception):
    """Raised by a job's work that ends with a method return code other than 0 (1 Not
    Supported): a caller still waiting gets the code (Jobs.run raises this), a job ends
    in Exception with `status` and `message`."""

    def __init__(self, rc: int, message: str, status: int = pywbem.CIM_ERR_NOT_SUPPORTED):
        super().__init__(message)
        self.rc, self.message, self.status = rc, message, status


@dataclass(eq=False)
class Job:
    """One job; times are wall-clock seconds (time.time())."""
    number: int
    method: str                      # "RequestStateChange"
    uuids: list[str]                 # the systems acted on (DefineSystem: once known)
    title: str                       # "RequestStateChange(4) of web"
    submitted: float = field(default_factory=time.time)
    state: int = RUNNING
    changed: float = 0.0
    finished: float | None = None
    error_code: int | None = None    # a CIM status code
    error: str | None = None
    version: int = 0
    task: asyncio.Task[Any] | None = field(default=None, repr=False)
    raised: BaseException | None = field(default=None, repr=False)
    result: Any = field(default=None, repr=False)
    phase: str = CALL
    # While phase is LIBVIRT: asks libvirt to abort its own job on the domain; True
    # when it did (there was one), False when there is nothing libvirt can abort.
    abort: Callable[[], Awaitable[bool]] | None = field(default=None, repr=False)
    stopping: int | None = None      # TERMINATED or KILLED once a client stopped it

    @property
    def instance_id(self) -> str:
        return f"{JOB_PREFIX}{self.number}"

    @property
    def uuid(self) -> str:
        return self.uuids[0] if self.uuids else ""


# The job whose work is running in this task (None outside a job's work).
_CURRENT: contextvars.ContextVar[Job | None] = contextvars.ContextVar("job", default=None)


def set_phase(phase: str, abort: Callable[[], Awaitable[bool]] | None = None) -> None:
    """The running work says what it waits on now (no-op outside a job)."""
    job = _CURRENT.get()
    if job is not None:
        job.phase, job.abort = phase, abort


def libvirt_abort(src: RunningSource, uuid: str) -> Callable[[], Awaitable[bool]]:
    """The abort hook of a job in a libvirt call on `uuid`: libvirt's own job on the
    domain (save, dump, migration: virDomainGetJobInfo not NONE) is aborted
    (virDomainAbortJob); False when there is none, or the driver has no jobs."""
    async def abort() -> bool:
        try:
            return await src.abort_job(uuid)
        except SourceError as exc:
            log.info("libvirt cannot abort a job of %s: %s", uuid, exc)
            return False
    return abort


def affects(uuid: str) -> None:
    """The running work now knows a system it acts on (DefineSystem: the new one)."""
    job = _CURRENT.get()
    if job is not None and uuid not in job.uuids:
        job.uuids.append(uuid)


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

    async def run(self, method: str, uuids: str | Iterable[str], title: str,
                  work: Coroutine[Any, Any, Any]) -> tuple[Job | None, Any]:
        """Run `work`; (None, its result) when it ended within `sync_wait` (its error,
        if any, is raised here as it was raised there), else (the job that follows
        it, None)."""
        job = Job(next(self._numbers), method,
                  [uuids] if isinstance(uuids, str) else list(uuids), title)
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
            return None, job.result
        self._jobs[job.instance_id] = job
        log.info("job %s started: %s", job.instance_id, title)
        self._notify(job, None)
        return job, None

    async def _follow(self, job: Job, work: Coroutine[Any, Any, Any]) -> None:
        _CURRENT.set(job)               # this task's own context
        try:
            job.result = await work
        except (CIMError, MethodReturn) as exc:
            job.raised = exc
            if job.stopping is not None:        # the libvirt call a client aborted
                how = "terminated" if job.stopping == TERMINATED else "killed"
                self._finish(job, job.stopping, None, f"{how} by a client")
            elif isinstance(exc, MethodReturn):
                self._finish(job, EXCEPTION, exc.status, exc.message)
            else:
                self._finish(job, EXCEPTION, exc.status_code, exc.status_description)
        except asyncio.CancelledError:
            if job.stopping is not None:        # a client stopped it (Jobs.stop)
                how = "terminated" if job.stopping == TERMINATED else "killed"
                self._finish(job, job.stopping, None, f"{how} by a client")
                return
            self._finish(job, KILLED, pywbem.CIM_ERR_FAILED, "the server stopped")
            raise
        except Exception as exc:        # a job must end, whatever went wrong
            log.exception("job %s failed", job.instance_id)
            job.raised = CIMError(pywbem.CIM_ERR_FAILED, f"internal error: {exc}")
            self._finish(job, EXCEPTION, pywbem.CIM_ERR_FAILED, f"internal error: {exc}")
        else:
            self._finish(job, COMPLETED, None, None)

    async def stop(self, job: Job, requested: int) -> int:
        """Terminate (4) or Kill (5) `job`: RC_OK once its work is stopped (the job
        ends Terminated / Killed), RC_ENDED when it had already ended, RC_NOT_SUPPORTED
        when it is in a call nothing can take back."""
        if job.state in _FINISHED or job.task is None or job.task.done():
            return RC_ENDED
        state = TERMINATED if requested == TERMINATE else KILLED
        if job.phase == LIBVIRT and job.abort is not None:
            abort = job.abort
            job.stopping = state
            try:
                aborted = await abort()
            except Exception:
                log.exception("job %s: aborting libvirt's job failed", job.instance_id)
                aborted = False
            if not aborted:
                job.stopping = None
                return RC_NOT_SUPPORTED if job.state not in _FINISHED else RC_ENDED
        elif job.phase != EVIDENCE:
            return RC_NOT_SUPPORTED
        if job.task.done():             # it ended meanwhile, on its own
            return RC_OK if job.state == state else RC_ENDED
        job.stopping = state
        log.info("job %s: %s by a client", job.instance_id,
                 "terminate" if state == TERMINATED else "kill")
        job.task.cancel()
        await asyncio.wait({job.task})
        return RC_OK

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
        "JobState": job.state,
        "JobStatus": _PHASE_TEXT[job.phase] if job.state == RUNNING else _STATUS[job.state],
        # Completed + OK / Error, or Stopped (10) when a client stopped it
        "OperationalStatus": [2] if job.state == RUNNING else [17, 2] if ok
        else [17, 10] if job.state in (TERMINATED, KILLED) else [17, 6],
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
            return await self._request_state_change(job, params), {}
        return await super().invoke_method(target, method, params)

    async def _request_state_change(self, job: Job, params: Mapping[str, Any]) -> int:
        """docs/architecture.md, "Jobs": 5 Invalid Parameter outside the ValueMap (2..6,
        32768..65535) or without a value; 4098 with a TimeoutPeriod; 4097 once the job
        has ended; Terminate / Kill: 0 when stopped, else 1; Start, Suspend, Service
        and vendor values: 1."""
        requested = params.get("RequestedState")
        if requested is None or (int(requested) not in (2, 3, 4, 5, 6)
                                 and not 32768 <= int(requested) <= 65535):
            return RC_INVALID_PARAMETER
        timeout = params.get("TimeoutPeriod")
        if timeout is not None and not (getattr(timeout, "is_interval", False)
                                        and not timeout.timedelta):
            return RC_TIMEOUT_NOT_SUPPORTED
        if job.state in _FINISHED:
            return RC_ENDED                  # Invalid State Transition: it has ended
        if int(requested) not in (TERMINATE, KILL):
            return RC_NOT_SUPPORTED
        return await self.jobs.stop(job, int(requested))

    def error_instance(self, job: Job) -> CIMInstance | None:
        """The job's error as an embedded CIM_Error (None while it has none): its
        failure, or that a client stopped it."""
        if job.state not in (EXCEPTION, TERMINATED, KILLED):
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

    def _assoc(self, cls: str, job: Job, uuid: str = "") -> CIMInstance:
        from .computer_system import system_path
        jp = job_path(job.instance_id)
        if cls == AJE_CLASS:
            keys = {"AffectedElement": system_path(uuid), "AffectingElement": jp}
            extra: dict[str, Any] = {"ElementEffects": [0]}
        else:
            keys = {"OwningElement": self.b.vsms_path(), "OwnedElement": jp}
            extra = {}
        return make(self.b, cls, {**keys, **extra}, CIMInstanceName(cls, keys, namespace=VIRT_NS))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        if classname.lower() == AJE_CLASS.lower():    # one per system the job acts on
            return [self._assoc(AJE_CLASS, j, u) for j in self.jobs.all() for u in j.uuids]
        return [self._assoc(OJE_CLASS, j) for j in self.jobs.all()]

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
