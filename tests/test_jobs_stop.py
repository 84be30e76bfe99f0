"""Issue 12: stopping a job (CIM_ConcreteJob.RequestStateChange 4 Terminate / 5 Kill),
with a RecordingManager on a private bus and libvirt's test driver (tests/support/
model.py MinimalModel): every answer of docs/architecture.md, "Jobs".

- A start whose StartDomain outlived its timeout is a job that follows the domain:
  Terminate / Kill stop following it (0); the job ends Terminated (8) / Killed (9),
  GetError says so, and RequestedState goes back to the last successful request.
- A StartDomain still with the Manager (a D-Bus call nothing can take back): 1.
- An ended job: 4097. Values outside the ValueMap, or none: 5. Start, Suspend,
  Service, vendor values: 1. A TimeoutPeriod: 4098.
The Manager is held at work by a gate the test opens (RecordingManager.gate), so which
stage a job is in is decided by the test, and read from the job's JobStatus.
"""
import threading

import pytest
import pywbem
from pywbem import CIMDateTime, CIMInstance, Uint16

try:
    from tests.support.model import CS, MinimalModel, cs_path, domain_config, poll_until
except ImportError:
    from support.model import CS, MinimalModel, cs_path, domain_config, poll_until  # type: ignore

pytestmark = pytest.mark.dbus

HELD = domain_config("stop-held", memory_kib=65536)
TERM = domain_config("stop-terminate", memory_kib=65536)
KILLED = domain_config("stop-kill", memory_kib=65536)
FOLLOWING = "waiting for the system to show the change"


@pytest.fixture(scope="module")
def model():
    m = MinimalModel([HELD, TERM, KILLED], relist=0.5, manager_timeout=2.0,
                     manager_start_timeout=60.0)
    jobs = m.server.dispatcher.registry.provider("root/virt", CS).jobs
    jobs.sync_wait = 0.0            # every change answers 4096 at once
    yield m
    m.close()


@pytest.fixture
def conn(model):
    c = model.conn()
    yield c
    c.close()


@pytest.fixture
def gate(model):
    """The Manager's StartDomain waits until the test opens the gate."""
    model.manager.gate = threading.Event()
    try:
        yield model.manager.gate
    finally:
        model.manager.gate.set()
        model.manager.gate = None
        model.client.start_timeout = 60.0


async def _call(fn):
    return fn()


def start(conn, uuid):
    rv, out = conn.InvokeMethod("RequestStateChange", cs_path(uuid),
                                RequestedState=Uint16(2))
    assert rv == 4096, rv
    return out["Job"]


def stop(conn, job, value, **extra):
    rv, _ = conn.InvokeMethod("RequestStateChange", job, RequestedState=Uint16(value),
                              **extra)
    return int(rv)


def status(conn, job):
    return conn.GetInstance(job)["JobStatus"]


@pytest.mark.parametrize("system,value,state,word", [(TERM, 4, 8, "terminated"),
                                                     (KILLED, 5, 9, "killed")])
def test_a_job_following_the_domain_is_stopped(model, conn, gate, system, value, state,
                                               word):
    model.client.start_timeout = 0.5        # StartDomain times out; the job follows
    gone: list[str] = []            # a StartDomain that timed out did not start anything:
    unsubscribe = model.lt.run(_call(lambda: model.inventory.subscribe(   # never absent
        lambda ch: gone.append(ch.uuid) if ch.kind == "deleted" else None)))
    try:
        job = start(conn, system.uuid)
        assert conn.GetInstance(cs_path(system.uuid))["RequestedState"] == 2
        poll_until(lambda: status(conn, job) == FOLLOWING, 20, "the job following the domain")
        model.client.start_timeout = 60.0
        model.lt.run(model.server.sources.manager.refresh())   # the settling re-list is over
    finally:
        model.lt.run(_call(unsubscribe))
    assert system.uuid not in gone
    assert stop(conn, job, value) == 0
    inst = conn.GetInstance(job)
    assert inst["JobState"] == state and inst["JobStatus"] == word
    assert inst["OperationalStatus"] == [17, 10]
    assert inst["ErrorDescription"] == f"{word} by a client"
    # the request is withdrawn: back to the last successful one (none yet: 12)
    assert conn.GetInstance(cs_path(system.uuid))["RequestedState"] == 12
    rv, out = conn.InvokeMethod("GetError", job)
    assert rv == 0 and isinstance(out["Error"], CIMInstance)
    assert out["Error"]["Message"] == f"{word} by a client"
    # over now: both answer 4097
    assert stop(conn, job, 4) == 4097 and stop(conn, job, 5) == 4097


def test_a_job_in_a_manager_call_cannot_be_stopped(model, conn, gate):
    job = start(conn, HELD.uuid)
    poll_until(lambda: HELD.uuid in model.manager.starts(), 10, "StartDomain called")
    assert status(conn, job) == "waiting for the Manager"
    assert stop(conn, job, 4) == 1
    assert stop(conn, job, 5) == 1
    # what else a running job answers
    for value in (2, 3, 6, 32768, 65535):       # Start, Suspend, Service, vendor
        assert stop(conn, job, value) == 1, value
    for value in (0, 1, 7, 100, 32767):         # not in the ValueMap
        assert stop(conn, job, value) == 5, value
    rv, _ = conn.InvokeMethod("RequestStateChange", job)   # no RequestedState
    assert rv == 5
    assert stop(conn, job, 4, TimeoutPeriod=CIMDateTime("00000000000010.000000:000")) == 4098
    assert conn.GetInstance(job)["JobState"] == 4
    gate.set()
    done = poll_until(lambda: (j := conn.GetInstance(job))["JobState"] != 4 and j, 20,
                      "the start job ended")
    assert done["JobState"] == 7, done.get("ErrorDescription")
    assert conn.GetInstance(cs_path(HELD.uuid))["RequestedState"] == 2
    assert stop(conn, job, 4) == 4097 and stop(conn, job, 5) == 4097
    assert stop(conn, job, 0) == 5              # checked before whether it ended


def test_an_unknown_job_is_not_found(conn):
    path = pywbem.CIMInstanceName("VIRT_ConcreteJob", {"InstanceID": "VIRT:job:999999"},
                                  namespace="root/virt")
    with pytest.raises(pywbem.CIMError) as err:
        conn.InvokeMethod("RequestStateChange", path, RequestedState=Uint16(4))
    assert err.value.status_code == pywbem.CIM_ERR_NOT_FOUND
