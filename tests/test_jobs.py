"""Jobs (issue 12) on libvirt's test driver, in process (tests/support/indications.py's
server fed by libvirt alone, pywbem as the client and pywbem's listener).

- A change done within --sync-wait answers 0 and leaves no job.
- With no wait at all, the same change answers 4096 and a VIRT_ConcreteJob that ends
  Completed on the evidence; its associations, GetError, Kill of an ended job, its
  InstCreation and InstModification indications.
- The options: --libvirt-timeout, --sync-wait, --shutdown-timeout reach the sources and
  the providers.
"""
import time
import uuid as uuidlib

import pytest
import pywbem
from pywbem import Uint16

try:
    from tests.support.indications import Console, LibvirtServer, Listener
    from tests.support.model import cs_path, domain_config, poll_until
except ImportError:
    from support.indications import Console, LibvirtServer, Listener  # type: ignore
    from support.model import cs_path, domain_config, poll_until  # type: ignore

from cim_provider import cli
from cim_provider.domain.domxml import config_to_domain_xml

JOBS = "SELECT * FROM CIM_InstIndication WHERE SourceInstance ISA VIRT_ConcreteJob"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LibvirtServer(tmp_path_factory.mktemp("jobs")).start()
    try:
        yield srv
    finally:
        srv.close()


def systems(srv):
    return srv.handle.dispatcher.registry.provider("root/virt", "VIRT_ComputerSystem")


def running_domain(srv, name):
    uuid = str(uuidlib.uuid4())
    srv.conn.createXML(config_to_domain_xml(domain_config(name, uuid=uuid,
                                                          memory_kib=16384)), 0)
    wbem = pywbem.WBEMConnection(srv.url, default_namespace="root/virt")
    poll_until(lambda: wbem.EnumerateInstanceNames("VIRT_ComputerSystem") and
               any(p["Name"] == uuid for p in wbem.EnumerateInstanceNames("VIRT_ComputerSystem")),
               10, "the domain seen")
    return uuid, wbem


def test_a_quick_change_answers_0_without_a_job(server):
    uuid, wbem = running_domain(server, "quick")
    rv, out = wbem.InvokeMethod("RequestStateChange", cs_path(uuid), RequestedState=Uint16(9))
    assert rv == 0 and "Job" not in out
    assert wbem.GetInstance(cs_path(uuid))["EnabledState"] == 9
    assert wbem.EnumerateInstances("VIRT_ConcreteJob") == []


def test_a_change_past_the_sync_wait_is_a_job_that_completes(server):
    uuid, wbem = running_domain(server, "slowish")
    listener = Listener()
    console = Console(server.url)
    try:
        console.subscribe(listener.url, JOBS, name="jobs", dest="jobs")
        systems(server).jobs.sync_wait = 0
        since = time.monotonic()
        rv, out = wbem.InvokeMethod("RequestStateChange", cs_path(uuid),
                                    RequestedState=Uint16(9))
        assert rv == 4096
        path = out["Job"]
        job = poll_until(lambda: (j := wbem.GetInstance(path))["JobState"] != 4 and j,
                         10, "the job ended")
        assert job["JobState"] == 7 and job["PercentComplete"] == 100
        assert job["ErrorCode"] == 0 and job.get("ErrorDescription") is None
        assert job["DeleteOnCompletion"] is False
        assert job["TimeBeforeRemoval"].timedelta.total_seconds() == 300
        assert job["TimeSubmitted"] is not None and job["ElapsedTime"].is_interval
        assert wbem.GetInstance(cs_path(uuid))["EnabledState"] == 9
        affected = wbem.AssociatorNames(path, AssocClass="VIRT_AffectedJobElement")
        assert [p["Name"] for p in affected] == [uuid]
        owner = wbem.AssociatorNames(path, AssocClass="VIRT_OwningJobElement")
        assert [p.classname for p in owner] == ["VIRT_VirtualSystemManagementService"]
        rv, out = wbem.InvokeMethod("GetError", path)
        assert rv == 0 and out.get("Error") is None
        rv, _ = wbem.InvokeMethod("RequestStateChange", path, RequestedState=Uint16(4))
        assert rv == 4097
        poll_until(lambda: len(listener.received) >= 2, 5, "two job indications")
        time.sleep(0.3)
        got = listener.take()
        assert all(r.at - since < 5 for r in got)
        kinds = [r.indication.classname for r in got]
        assert kinds == ["CIM_InstCreation", "CIM_InstModification"]
        assert got[1].indication["SourceInstance"]["JobState"] == 7
        assert got[1].indication["PreviousInstance"]["JobState"] == 4
    finally:
        systems(server).jobs.sync_wait = 2.0
        console.close()
        listener.stop()


def test_options_reach_sources_and_providers():
    args = cli.parse_args(["serve", "--libvirt-timeout", "3", "--sync-wait", "0.5",
                           "--shutdown-timeout", "7"])
    assert (args.libvirt_timeout, args.sync_wait, args.shutdown_timeout) == (3.0, 0.5, 7.0)
    args = cli.parse_args(["serve"])
    assert (args.libvirt_timeout, args.sync_wait, args.shutdown_timeout) == (10.0, 2.0, 300.0)


def test_libvirt_timeout_is_the_sources_call_timeout(server):
    from cim_provider.server.main import start_sources

    async def body():       # on the server's loop, where libvirt's events are bound
        sources = await start_sources(libvirt_uri="test:///default", manager_bus=None,
                                      call_timeout=3.5, metrics_interval=0)
        try:
            return sources.libvirt.call_timeout
        finally:
            await sources.close()
    assert server.lt.run(body()) == 3.5
