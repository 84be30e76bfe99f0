"""Issue 12: the management service's methods are jobs like RequestStateChange, against
the in-process demo (reference Manager with SQLite + libvirt stores on a private bus,
libvirt's test driver), pywbem as the client and pywbem's listener.

For DefineSystem, DestroySystem (of a definition, and of a running domain through
libvirt), ModifySystemSettings, AddResourceSettings, ModifyResourceSettings and
RemoveResourceSettings, both answers (docs/architecture.md, "Jobs"):
- "sync": --sync-wait far longer than the change: 0, with ResultingSystem /
  ResultingResourceSettings, and no job;
- "job": --sync-wait 0 (the answer cannot wait for anything): 4096 and a `Job` that
  ends Completed (7); the result is found through VIRT_AffectedJobElement; the job's
  InstCreation and InstModification indications.
A change the Manager refuses ends the job in Exception (10) with the Manager's reason,
and GetError returns it as an embedded CIM_Error (pywbem, pywbemcli, sblim wbemcli).
"""
import contextlib
import re
import time
import uuid as uuidlib

import pytest
import pywbem
from pywbem import CIMInstance, Uint16, Uint64

try:
    from tests.support.indications import Console, Listener
    from tests.support.model import (CS, EPASD, RASD, SASD, VSSD, cim_error, cs_path, demo,
                                     domain_config, iid_path, poll_until, pywbemcli,
                                     vsms_path, vssd_path, wbem_url, wbemcli)
except ImportError:
    from support.indications import Console, Listener  # type: ignore
    from support.model import (CS, EPASD, RASD, SASD, VSSD, cim_error, cs_path,  # type: ignore  # noqa: F401 (demo: a fixture)
                               demo, domain_config, iid_path, poll_until, pywbemcli,
                               vsms_path, vssd_path, wbem_url, wbemcli)

from cim_provider.domain.domxml import config_to_domain_xml

pytestmark = pytest.mark.dbus
JOBS = "SELECT * FROM CIM_InstIndication WHERE SourceInstance ISA VIRT_ConcreteJob"
MODES = ["sync", "job"]


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "extra.img"
    path.write_bytes(b"\0" * 4096)
    return str(path)


def jobs_of(demo):
    return demo.demo.server.dispatcher.registry.provider("root/virt", CS).jobs


@contextlib.contextmanager
def answering(demo, mode):
    """"sync": a wait no change here comes near (0 is certain); "job": no wait at all
    (4096 is certain: the answer is given before the work has run)."""
    jobs = jobs_of(demo)
    before = jobs.sync_wait
    jobs.sync_wait = 600.0 if mode == "sync" else 0.0
    try:
        yield
    finally:
        jobs.sync_wait = before


def ended(conn, path):
    return poll_until(lambda: (j := conn.GetInstance(path))["JobState"] != 4 and j,
                      20, f"{path['InstanceID']} ended")


def affected(conn, job_path):
    return conn.AssociatorNames(job_path, AssocClass="VIRT_AffectedJobElement")


def define(conn, name, *rasds):
    vssd = CIMInstance(VSSD, properties={"ElementName": name, "VirtualSystemType": "Test"})
    return conn.InvokeMethod("DefineSystem", vsms_path(), SystemSettings=vssd,
                             ResourceSettings=[
                                 CIMInstance(RASD, properties={
                                     "ResourceType": Uint16(4),
                                     "VirtualQuantity": Uint64(65536)}), *rasds])


def defined_system(conn, name):
    """A new definition (answered at once: the caller's mode is not set yet)."""
    rv, out = define(conn, name)
    assert rv == 0, rv
    return out["ResultingSystem"]["Name"]


def check_outcome(conn, mode, rv, out, uuid=None):
    """0 and no job, or 4096 and a job that completed and names `uuid` (when given)
    as its affected system, owned by the service; the job's path, or None."""
    if mode == "sync":
        assert rv == 0 and "Job" not in out, (rv, out)
        assert conn.EnumerateInstances("VIRT_ConcreteJob") == [] or all(
            j["JobState"] != 4 for j in conn.EnumerateInstances("VIRT_ConcreteJob"))
        return None
    assert rv == 4096, (rv, out)
    assert set(out) == {"Job"}, out           # results come through the job
    job = ended(conn, out["Job"])
    assert job["JobState"] == 7, job.get("ErrorDescription")
    assert job["ErrorCode"] == 0 and job["PercentComplete"] == 100
    if uuid is not None:
        assert [p["Name"] for p in affected(conn, out["Job"])] == [uuid]
    owner = conn.AssociatorNames(out["Job"], AssocClass="VIRT_OwningJobElement")
    assert [p.classname for p in owner] == ["VIRT_VirtualSystemManagementService"]
    rv, err = conn.InvokeMethod("GetError", out["Job"])
    assert rv == 0 and err.get("Error") is None
    return out["Job"]


@pytest.mark.parametrize("mode", MODES)
def test_define_system(demo, conn, mode):
    name = f"jobs-define-{mode}"
    with answering(demo, mode):
        rv, out = define(conn, name)
    job = check_outcome(conn, mode, rv, out)
    if mode == "sync":
        system = out["ResultingSystem"]
    else:      # the new system, found through the job once it is known
        (system,) = affected(conn, job)
        assert conn.GetInstance(job)["Name"] == "DefineSystem"
    inst = conn.GetInstance(system)
    assert inst["ElementName"] == name and inst["EnabledState"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_modify_system_settings(demo, conn, mode):
    uuid = defined_system(conn, f"jobs-mss-{mode}")
    vssd = CIMInstance(VSSD, properties={"InstanceID": f"VIRT:defined:{uuid}",
                                         "ElementName": f"jobs-mss-{mode}-renamed"})
    with answering(demo, mode):
        rv, out = conn.InvokeMethod("ModifySystemSettings", vsms_path(), SystemSettings=vssd)
    check_outcome(conn, mode, rv, out, uuid)
    assert conn.GetInstance(cs_path(uuid))["ElementName"] == f"jobs-mss-{mode}-renamed"


@pytest.mark.parametrize("mode", MODES)
def test_add_modify_remove_resource_settings(demo, conn, image, mode):
    uuid = defined_system(conn, f"jobs-rasd-{mode}")
    disk = CIMInstance(SASD, properties={"ResourceType": Uint16(17), "Address": "vdb",
                                         "HostResource": [image]})
    disk_path = iid_path(SASD, f"VIRT:defined:{uuid}/vdb")
    with answering(demo, mode):
        rv, out = conn.InvokeMethod("AddResourceSettings", vsms_path(),
                                    AffectedConfiguration=vssd_path("defined", uuid),
                                    ResourceSettings=[disk])
    check_outcome(conn, mode, rv, out, uuid)
    if mode == "sync":
        assert [p["InstanceID"] for p in out["ResultingResourceSettings"]] == \
            [disk_path["InstanceID"]]
    assert conn.GetInstance(disk_path)["HostResource"] == [image]

    proc = CIMInstance(RASD, properties={"InstanceID": f"VIRT:defined:{uuid}/proc",
                                         "ResourceType": Uint16(3),
                                         "VirtualQuantity": Uint64(2)})
    with answering(demo, mode):
        rv, out = conn.InvokeMethod("ModifyResourceSettings", vsms_path(),
                                    ResourceSettings=[proc])
    check_outcome(conn, mode, rv, out, uuid)
    if mode == "sync":
        assert [p["InstanceID"] for p in out["ResultingResourceSettings"]] == \
            [f"VIRT:defined:{uuid}/proc"]
    assert conn.GetInstance(iid_path(RASD, f"VIRT:defined:{uuid}/proc"))[
        "VirtualQuantity"] == 2

    with answering(demo, mode):
        rv, out = conn.InvokeMethod("RemoveResourceSettings", vsms_path(),
                                    ResourceSettings=[disk_path])
    check_outcome(conn, mode, rv, out, uuid)
    err = cim_error(lambda: conn.GetInstance(disk_path))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND


@pytest.mark.parametrize("mode", MODES)
def test_destroy_system_of_a_definition(demo, conn, mode):
    uuid = defined_system(conn, f"jobs-destroy-{mode}")
    with answering(demo, mode):
        rv, out = conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=cs_path(uuid))
    check_outcome(conn, mode, rv, out, uuid)
    assert cim_error(lambda: conn.GetInstance(cs_path(uuid))).status_code == \
        pywbem.CIM_ERR_NOT_FOUND


@pytest.mark.parametrize("mode", MODES)
def test_destroy_system_of_a_running_domain(demo, conn, mode):
    """A transient libvirt domain: DestroySystem is a libvirt destroy."""
    uuid = str(uuidlib.uuid4())
    demo.libvirt.createXML(config_to_domain_xml(domain_config(f"jobs-run-{mode}", uuid=uuid,
                                                              memory_kib=16384)), 0)
    poll_until(lambda: any(p["Name"] == uuid for p in conn.EnumerateInstanceNames(CS)),
               10, "the domain seen")
    with answering(demo, mode):
        rv, out = conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=cs_path(uuid))
    check_outcome(conn, mode, rv, out, uuid)
    assert uuid not in [p["Name"] for p in conn.EnumerateInstanceNames(CS)]


def test_bad_input_is_an_error_at_once_even_without_a_wait(demo, conn):
    """Input is checked before the work starts: no job for a call that cannot work."""
    with answering(demo, "job"):
        err = cim_error(lambda: conn.InvokeMethod(
            "DefineSystem", vsms_path(), SystemSettings=CIMInstance(
                VSSD, properties={"VirtualSystemType": "Test"})))
        assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
        err = cim_error(lambda: conn.InvokeMethod(
            "DestroySystem", vsms_path(), AffectedSystem=cs_path(str(uuidlib.uuid4()))))
        assert err.status_code == pywbem.CIM_ERR_NOT_FOUND
    assert all(j["JobState"] != 4 for j in conn.EnumerateInstances("VIRT_ConcreteJob"))


def test_a_refused_change_ends_the_job_in_exception_with_get_error(demo, conn, tmp_path):
    """The name is taken: the Manager refuses after 4096 was answered."""
    defined_system(conn, "jobs-taken")
    with answering(demo, "job"):
        rv, out = define(conn, "jobs-taken")
    assert rv == 4096
    job = ended(conn, out["Job"])
    assert job["JobState"] == 10 and job["ErrorCode"] == pywbem.CIM_ERR_FAILED
    assert "already used" in job["ErrorDescription"], job["ErrorDescription"]
    assert job["OperationalStatus"] == [17, 6]
    assert affected(conn, out["Job"]) == []      # no system was made
    rv, err = conn.InvokeMethod("GetError", out["Job"])
    error = err["Error"]
    assert rv == 0 and isinstance(error, CIMInstance), type(error)
    assert error.classname == "CIM_Error"
    assert error["Message"] == job["ErrorDescription"]
    assert error["CIMStatusCode"] == pywbem.CIM_ERR_FAILED

    # pywbemcli shows the embedded instance as one (MOF), not as escaped XML
    iid = out["Job"]["InstanceID"]
    proc = pywbemcli(demo.url, tmp_path, "instance", "invokemethod",
                     f'VIRT_ConcreteJob.InstanceID="{iid}"', "GetError",
                     "--namespace", "root/virt")
    assert proc.returncode == 0, proc.stderr
    assert "instance of CIM_Error" in proc.stdout and "already used" in proc.stdout, proc.stdout
    assert "&lt;" not in proc.stdout

    # sblim wbemcli reads the answer without a parse error (and shows the XML text)
    wb = wbemcli("cm", wbem_url(demo.url, "root/virt", "VIRT_ConcreteJob",
                                f'InstanceID="{iid}"'), "GetError")
    assert re.search(r"GetError:\s*0", wb.stdout), wb.stdout
    assert "already used" in wb.stdout, wb.stdout


def test_job_indications_for_each_method(demo, conn, image):
    """Every method's job appears (InstCreation) and completes (InstModification 4 -> 7)."""
    listener = Listener()
    console = Console(demo.url)
    try:
        console.subscribe(listener.url, JOBS, name="method-jobs", dest="method-jobs")
        uuid = defined_system(conn, "jobs-indications")
        disk_path = iid_path(SASD, f"VIRT:defined:{uuid}/vdc")
        calls = [
            ("DefineSystem", lambda: define(conn, "jobs-indications-2")),
            ("ModifySystemSettings", lambda: conn.InvokeMethod(
                "ModifySystemSettings", vsms_path(), SystemSettings=CIMInstance(
                    VSSD, properties={"InstanceID": f"VIRT:defined:{uuid}",
                                      "ElementName": "jobs-indications-renamed"}))),
            ("AddResourceSettings", lambda: conn.InvokeMethod(
                "AddResourceSettings", vsms_path(),
                AffectedConfiguration=vssd_path("defined", uuid),
                ResourceSettings=[CIMInstance(EPASD, properties={
                    "ResourceType": Uint16(10), "Address": "52:54:00:ab:cd:01",
                    "Connection": ["default"]}), CIMInstance(SASD, properties={
                        "ResourceType": Uint16(17), "Address": "vdc",
                        "HostResource": [image]})])),
            ("ModifyResourceSettings", lambda: conn.InvokeMethod(
                "ModifyResourceSettings", vsms_path(), ResourceSettings=[CIMInstance(
                    RASD, properties={"InstanceID": f"VIRT:defined:{uuid}/proc",
                                      "ResourceType": Uint16(3),
                                      "VirtualQuantity": Uint64(3)})])),
            ("RemoveResourceSettings", lambda: conn.InvokeMethod(
                "RemoveResourceSettings", vsms_path(), ResourceSettings=[disk_path])),
            ("DestroySystem", lambda: conn.InvokeMethod(
                "DestroySystem", vsms_path(), AffectedSystem=cs_path(uuid))),
        ]
        for method, call in calls:
            listener.take()
            with answering(demo, "job"):
                rv, out = call()
            assert rv == 4096, (method, rv)
            assert ended(conn, out["Job"])["JobState"] == 7, method
            poll_until(lambda: len(listener.received) >= 2, 10, f"{method}: 2 indications")
            time.sleep(0.3)            # nothing more may come
            got = listener.take()
            assert [r.indication.classname for r in got] == \
                ["CIM_InstCreation", "CIM_InstModification"], (method, got)
            created, modified = (r.indication["SourceInstance"] for r in got)
            assert created["InstanceID"] == out["Job"]["InstanceID"] == modified["InstanceID"]
            assert created["Name"] == method and created["JobState"] == 4
            assert modified["JobState"] == 7
            assert got[1].indication["PreviousInstance"]["JobState"] == 4
    finally:
        console.close()
        listener.stop()


def test_capabilities_list_the_methods_that_may_answer_4096(conn):
    """DSP1042: SynchronousMethodsSupported (may answer 0) and AsynchronousMethodsSupported
    (may answer 4096 and a job) both list DefineSystem 2, DestroySystem 3,
    ModifyResourceSettings 5, ModifySystemSettings 6, RemoveResourceSettings 7 and
    AddResourceSettings 10."""
    (caps,) = conn.EnumerateInstances("VIRT_VirtualSystemManagementCapabilities")
    got = conn.GetInstance(caps.path)
    for inst in (caps, got):
        assert sorted(inst["SynchronousMethodsSupported"]) == [2, 3, 5, 6, 7, 10]
        assert sorted(inst["AsynchronousMethodsSupported"]) == [2, 3, 5, 6, 7, 10]
        assert inst.properties["AsynchronousMethodsSupported"].type == "uint16"
    (via_service,) = conn.Associators(vsms_path(), AssocClass="VIRT_ElementCapabilities")
    assert via_service["AsynchronousMethodsSupported"] == got["AsynchronousMethodsSupported"]
