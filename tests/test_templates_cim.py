"""Templates through CIM (issue 15): DSP1057 reference configurations.

The in-process demo as `cim-provider demo` runs it (its two templates and three
templated passive domains), plus the three templates of tests/support/templates.py
written into its templates folder. Each template is a VIRT_VirtualSystemSettingData
`VIRT:template:<name>` associated to the management service; DefineSystem with one as
ReferenceConfiguration defines from it (pywbem and wbemcli); the result is an ordinary
passive system, started through RequestStateChange as libvirt runs its rendered XML.
"""
import re
import time
import uuid as uuidlib

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, Uint16, Uint64

from cim_provider.manager.store import Templated
from cim_provider.manager.templates import variables_json

try:
    from tests.support.model import (CS, HOST, RASD, SASD, VIRT, VSSD, LoopThread, cim_error,
                                     connect_wbem, cs_path, reset_test_default, rsc,
                                     vsms_path, vssd_path, wbem_url, wbem_vsms, wbemcli)
    from tests.support.templates import write_templates
except ImportError:          # tests/ itself is on sys.path
    from support.model import (CS, HOST, RASD, SASD, VIRT, VSSD, LoopThread,  # type: ignore
                               cim_error, connect_wbem, cs_path, reset_test_default, rsc,
                               vsms_path, vssd_path, wbem_url, wbem_vsms, wbemcli)
    from support.templates import write_templates  # type: ignore

pytestmark = pytest.mark.dbus
ESD = "VIRT_ElementSettingData"


class TemplatesDemo:
    """start_demo(templates=True) on a free port, with three more templates."""

    def __init__(self) -> None:
        from cim_provider.demo import start_demo
        reset_test_default()
        self.lt = LoopThread()
        try:
            # The examples show DefineSystem's synchronous answer; a loaded test machine
            # must not turn them into jobs (the job answers: tests/test_jobs_methods.py).
            self.demo = self.lt.run(start_demo([("127.0.0.1", 0)], host=HOST, templates=True,
                                               sync_wait=60.0))
        except BaseException:
            self.lt.stop()
            raise
        write_templates(self.demo.workdir / "templates")
        self.url = f"http://127.0.0.1:{self.demo.server.addresses[0][1]}"
        self.libvirt = self.demo.conn
        self.sqlite = self.demo.stores[0]

    @property
    def inventory(self):
        return self.demo.server.sources.inventory

    def conn(self):
        return connect_wbem(self.url, VIRT)

    def close(self) -> None:
        try:
            reset_test_default()
            self.lt.run(self.demo.close(), 30)
        finally:
            self.lt.stop()


@pytest.fixture(scope="module")
def demo():
    d = TemplatesDemo()
    yield d
    d.close()


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


def template_path(name):
    return CIMInstanceName(VSSD, {"InstanceID": f"VIRT:template:{name}"}, namespace=VIRT)


def wait(predicate, within=10.0, what="condition"):
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(0.05)


def templates(conn):
    return {i["ElementName"]: i for i in conn.EnumerateInstances(VSSD)
            if i["InstanceID"].startswith("VIRT:template:")}


def parts(conn, uuid):
    found = conn.Associators(vssd_path("defined", uuid),
                             AssocClass="VIRT_VirtualSystemSettingDataComponent")
    prefix = f"VIRT:defined:{uuid}/"
    return {p["InstanceID"][len(prefix):]: p for p in found}


def by_name(conn, name):
    return next((i for i in conn.EnumerateInstances(CS) if i["ElementName"] == name), None)


def test_templates_are_reference_configurations(demo, conn):
    # "desktop" is both the demo's and ours (ours replaced the file): four of them
    found = wait(lambda: (t := templates(conn)) and len(t) == 4 and t, 10, "four templates")
    assert sorted(found) == ["desktop", "named", "server", "small-server"]
    desk = conn.GetInstance(template_path("desktop"))
    assert desk["TemplateVariables"] == ["owner=string", "vcpus=int:2",
                                         "memory_kib=int:524288", "sound=bool:true"]
    assert desk["Description"] == "A desktop with two NICs." and desk["ChangeableType"] == 0
    small = found["small-server"]
    assert small["TemplateVariables"] == [
        "vcpus=int:1", "memory_kib=int:262144", "images=string:/var/lib/images",
        "network=string:default"]
    # associated to the management service, both ways
    linked = conn.AssociatorNames(vsms_path(), AssocClass=ESD)
    assert {p["InstanceID"] for p in linked} == {f"VIRT:template:{n}" for n in found}
    assert [p.classname for p in conn.AssociatorNames(template_path("named"),
                                                      AssocClass=ESD)] == \
        ["VIRT_VirtualSystemManagementService"]
    refs = conn.References(template_path("named"), ResultClass=ESD)
    assert len(refs) == 1 and refs[0]["IsDefault"] == 2
    err = cim_error(lambda: conn.GetInstance(template_path("nope")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND


def test_the_demo_ships_templated_systems(demo, conn):
    web2 = wait(lambda: by_name(conn, "app-2"), 10, "app-2")
    assert web2["EnabledState"] == 3
    p = parts(conn, web2["Name"])
    assert p["proc"]["VirtualQuantity"] == 2 and p["mem"]["VirtualQuantity"] == 393216
    assert p["vda"]["HostResource"] == ["/var/lib/images/app-2.qcow2"]
    alice = by_name(conn, "desk-alice")
    assert conn.GetInstance(vssd_path("defined", alice["Name"]))["Description"] == \
        "Desktop of Alice"
    assert len([k for k in parts(conn, alice["Name"]) if ":" in k]) == 2     # two NICs


def define(conn, template, name, variables=(), rasds=()):
    props = {"ElementName": name}
    if variables:
        props["TemplateVariables"] = list(variables)
    params = {"SystemSettings": CIMInstance(VSSD, properties=props),
              "ReferenceConfiguration": template_path(template)}
    if rasds:
        params["ResourceSettings"] = list(rasds)
    rv, out = conn.InvokeMethod("DefineSystem", vsms_path(), **params)
    return int(rv), out.get("ResultingSystem")


def test_define_system_from_a_template_with_pywbem(demo, conn):
    rv, system = define(conn, "desktop", "desk-carol", ["owner=Carol", "sound=false"], [
        CIMInstance(RASD, properties={"ResourceType": Uint16(3), "VirtualQuantity": Uint64(4)}),
        CIMInstance(RASD, properties={"ResourceType": Uint16(4),
                                      "VirtualQuantity": Uint64(768),
                                      "AllocationUnits": "byte*2^20"})])
    assert rv == 0 and system.classname == CS
    uuid = system["Name"]
    cs = conn.GetInstance(cs_path(uuid))
    assert (cs["ElementName"], cs["EnabledState"]) == ("desk-carol", 3)
    p = parts(conn, uuid)
    assert p["proc"]["VirtualQuantity"] == 4 and p["mem"]["VirtualQuantity"] == 768 * 1024
    nics = [v for k, v in p.items() if ":" in k]
    assert len(nics) == 2 and {n["ResourceSubType"] for n in nics} == {"virtio", "e1000"}
    assert p["vda"]["HostResource"] == ["/var/lib/images/desktop-carol.qcow2"]
    assert conn.GetInstance(vssd_path("defined", uuid))["Description"] == "Desktop of Carol"

    # and it starts: libvirt runs the rendered XML
    assert rsc(conn, uuid, 2) == 0
    xml = demo.libvirt.lookupByUUIDString(uuid).XMLDesc(0)
    assert "<title>Desktop of Carol</title>" in xml and "desktop-carol.qcow2" in xml
    assert "<sound" not in xml and xml.count("<interface") == 2
    assert "<vcpu placement='static'>4</vcpu>" in xml or ">4</vcpu>" in xml
    for nic in nics:
        assert nic["Address"] in xml
    assert conn.GetInstance(cs_path(uuid))["EnabledState"] == 2
    assert rsc(conn, uuid, 3) == 0                 # back to passive
    wait(lambda: conn.GetInstance(cs_path(uuid))["EnabledState"] == 3, 10, "passive again")


def test_define_system_from_a_template_with_wbemcli(demo, conn):
    """wbemcli: one embedded instance per array, no comma inside (README)."""
    out = wbemcli(
        "cm", wbem_vsms(demo.url),
        'DefineSystem.SystemSettings="instance of VIRT_VirtualSystemSettingData '
        '{ ElementName = "by-wbemcli"; TemplateVariables = {"images=/srv/vm"}; }",'
        'ResourceSettings="instance of VIRT_ResourceAllocationSettingData '
        '{ ResourceType = 4; VirtualQuantity = 196608; AllocationUnits = "byte*2^10"; }",'
        'ReferenceConfiguration=root/virt:VIRT_VirtualSystemSettingData.'
        'InstanceID="VIRT:template:named"').stdout
    m = re.search(r'DefineSystem: 0, ResultingSystem \(reference\): root/virt:'
                  r'VIRT_ComputerSystem\.CreationClassName="VIRT_ComputerSystem",'
                  r'Name="([0-9a-f-]{36})"', out)
    assert m, out
    p = parts(conn, m.group(1))
    assert p["vda"]["HostResource"] == ["/srv/vm/by-wbemcli.qcow2"]
    assert p["mem"]["VirtualQuantity"] == 196608
    # the template VSSD as wbemcli sees it
    gi = wbemcli("-nl", "gi", wbem_url(demo.url, VIRT, VSSD,
                                       'InstanceID="VIRT:template:named"')).stdout
    assert "-TemplateVariables=" in gi and "images=string:/var/lib/images" in gi


@pytest.mark.parametrize("template, variables, rasds, code, words", [
    ("nope", [], [], pywbem.CIM_ERR_NOT_FOUND, ["no template 'nope'"]),
    ("desktop", [], [], pywbem.CIM_ERR_INVALID_PARAMETER, ["variable owner is required"]),
    ("desktop", ["owner=x", "vcpus=lots"], [], pywbem.CIM_ERR_INVALID_PARAMETER,
     ["variable vcpus"]),
    ("desktop", ["owner=x", "colour=red"], [], pywbem.CIM_ERR_INVALID_PARAMETER,
     ["colour"]),
    ("desktop", ["owner"], [], pywbem.CIM_ERR_INVALID_PARAMETER,
     ["TemplateVariables[0]", "name=value"]),
    ("named", [], [CIMInstance(SASD, properties={"ResourceType": Uint16(17),
                                                 "Address": "vdb"})],
     pywbem.CIM_ERR_INVALID_PARAMETER, ["ResourceSettings[0]", "processor (3) and memory (4)"]),
    ("named", [], [CIMInstance(RASD, properties={"ResourceType": Uint16(3),
                                                 "VirtualQuantity": Uint64(99)})],
     pywbem.CIM_ERR_INVALID_PARAMETER, ["variable vcpus", "maximum 8"]),
    ("desktop", ["owner=" + "x" * 5000], [], pywbem.CIM_ERR_INVALID_PARAMETER,
     ["variable owner", "4096"]),
])
def test_define_errors(demo, conn, template, variables, rasds, code, words):
    err = cim_error(lambda: define(conn, template, f"bad-{uuidlib.uuid4().hex[:6]}",
                                   variables, rasds))
    assert err.status_code == code, err
    for w in words:
        assert w in err.status_description, (w, err.status_description)


def test_reference_configuration_must_be_a_template(demo, conn):
    gnome = "1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0001"
    vssd = CIMInstance(VSSD, properties={"ElementName": "clone"})
    err = cim_error(lambda: conn.InvokeMethod("DefineSystem", vsms_path(), SystemSettings=vssd,
                                              ReferenceConfiguration=vssd_path("defined",
                                                                               gnome)))
    assert err.status_code == pywbem.CIM_ERR_NOT_SUPPORTED


def test_hostile_names_stay_names(demo, conn):
    rv, system = define(conn, "named", "</name><devices>", ["images=/x'/><y z='"])
    assert rv == 0
    cs = conn.GetInstance(cs_path(system["Name"]))
    assert cs["ElementName"] == "</name><devices>"
    p = parts(conn, system["Name"])
    assert set(p) == {"proc", "mem", "vda"}
    assert p["vda"]["HostResource"] == ["/x'/><y z='/</name><devices>.qcow2"]


def test_a_thousand_templated_rows_are_a_thousand_passive_systems(demo, conn):
    rows = [Templated(str(uuidlib.UUID(int=(1 << 100) + i)), f"t-{i:04d}", "server",
                      variables_json({"vcpus": 1 + i % 8, "memory_kib": 65536 + 1024 * i,
                                      "disk": f"/img/t-{i}.qcow2"}))
            for i in range(1000)]
    demo.sqlite.define_many_templated(rows)
    wait(lambda: sum(1 for r in demo.inventory.records() if r.name.startswith("t-")) == 1000,
         30, "1,000 systems in the inventory")
    systems = {i["Name"]: i for i in conn.EnumerateInstances(CS) if
               i["ElementName"].startswith("t-")}
    assert len(systems) == 1000 and {s["EnabledState"] for s in systems.values()} == {3}
    rasds = conn.EnumerateInstances(RASD)
    mem = {r["InstanceID"]: r["VirtualQuantity"] for r in rasds
           if r["InstanceID"].endswith("/mem")}
    proc = {r["InstanceID"]: r["VirtualQuantity"] for r in rasds
            if r["InstanceID"].endswith("/proc")}
    disks = {r["InstanceID"]: r.get("HostResource") for r in conn.EnumerateInstances(SASD)}
    for i, row in enumerate(rows):
        base = f"VIRT:defined:{row.uuid}"
        assert mem[base + "/mem"] == 65536 + 1024 * i
        assert proc[base + "/proc"] == 1 + i % 8
        assert disks[base + "/vda"] == [f"/img/t-{i}.qcow2"]


def test_readme_templates_examples(demo, conn):
    """The ```sh block of README.md's "Templates" section, run as written (the port
    substituted), and what it says checked."""
    import subprocess
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = re.search(r"^## Templates\n(.*?)(?=^## )", readme, re.M | re.S).group(1)
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S)
    script = blocks[-1].replace("localhost:5988", demo.url[len("http://"):])
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "TemplateVariables=" in proc.stdout and "VIRT:template:small-server" in proc.stdout
    assert "DefineSystem: 0" in proc.stdout, proc.stdout
    app3 = wait(lambda: by_name(conn, "app-3"), 5, "app-3")
    p = parts(conn, app3["Name"])
    assert p["vda"]["HostResource"] == ["/srv/vm/app-3.qcow2"]
    assert p["mem"]["VirtualQuantity"] == 196608
