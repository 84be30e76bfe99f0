"""sblim wbemcli (a real C++ client with a hand-written parser) against the server.

interop: `cim-provider serve` in a subprocess. root/virt: the in-process server with
test providers (associations, a method with parameters, every CIM type).
wbemcli sends `CIMObject` URL-escaped, keys with VALUETYPE only and method parameters
without PARAMTYPE; its output is checked, not just its exit code.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
from pywbem import Uint16, CIMDateTime

try:
    from tests.support import wbem_server as ws
except ImportError:
    from support import wbem_server as ws

pytestmark = [pytest.mark.skipif(shutil.which("wbemcli") is None,
                                 reason="sblim wbemcli is not installed"),
              pytest.mark.timeout(120)]


def wbemcli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["wbemcli", *args], capture_output=True, text=True, timeout=60)


def ok(*args: str) -> list[str]:
    r = wbemcli(*args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "wbemcli:" not in r.stderr
    return [line for line in r.stdout.splitlines() if line.strip()]


def fails(code_name: str, *args: str) -> str:
    r = wbemcli(*args)
    assert r.returncode != 0, (args, r.stdout)
    assert code_name in r.stderr, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def interop(subprocess_server):
    return f"{subprocess_server.url}/interop"


@pytest.fixture(scope="module")
def virt(inproc_server):
    return f"{inproc_server.url}/root/virt"


def guest(virt: str, i: int = 0) -> str:
    return (f'{virt}:VIRT_ComputerSystem.CreationClassName="VIRT_ComputerSystem",'
            f'Name="{ws.GUEST_UUIDS[i]}"')


# --- interop ------------------------------------------------------------------------------

def test_ecn(interop, subprocess_server):
    lines = ok("ecn", f"{interop}:CIM_ManagedElement")
    prefix = f"127.0.0.1:{subprocess_server.port}/interop:"
    assert all(line.startswith(prefix) for line in lines)
    classes = {line[len(prefix):] for line in lines}
    assert {"CIM_Namespace", "CIM_ObjectManager", "VIRT_RegisteredProfile",
            "CIM_ManagedSystemElement"} <= classes
    assert "CIM_ManagedElement" not in classes
    assert ok("ecn", f"{interop}:CIM_Namespace") == []          # no subclasses


def test_ec(interop):
    lines = ok("ec", f"{interop}:CIM_WBEMService")
    ecl = [line for line in lines if line.split(" ", 1)[0].endswith(":CIM_ObjectManager")]
    assert len(ecl) == 1
    props = ecl[0].split(" ", 1)[1]
    assert "Name=" in props and "ElementName=" in props and "Description=" in props


def test_gc_with_qualifiers(interop):
    lines = ok("-t", "gc", f"{interop}:CIM_Namespace")
    assert len(lines) == 1
    path, props = lines[0].split(" ", 1)
    assert path.endswith("/interop:CIM_Namespace")
    fields = props.split(",")
    # keys are marked '#' from the Key qualifier; LocalOnly=false brings inherited ones
    for key in ("SystemCreationClassName", "SystemName", "ObjectManagerCreationClassName",
                "ObjectManagerName", "CreationClassName", "Name"):
        assert f"{key}#=" in fields, key
    assert "ElementName=" in fields and "ClassInfo=" in fields


def test_gc_response_carries_qualifiers(interop):
    r = wbemcli("-dx", "gc", f"{interop}:CIM_ObjectManager")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert '<QUALIFIER NAME="Key"' in out and '<QUALIFIER NAME="Description"' in out
    assert "/>" not in out.split("From server: <?xml", 1)[1]


def test_ei(interop):
    lines = ok("ei", f"{interop}:CIM_Namespace")
    assert len(lines) == 2
    assert any('Name="root/virt"' in line.split(" ", 1)[1] for line in lines)
    assert any('Name="interop"' in line.split(" ", 1)[1] for line in lines)
    for line in lines:
        assert ',ObjectManagerName="cim-provider",' in line


def test_ei_property_list(interop):
    lines = ok("ei", f"{interop}:CIM_Namespace", "Name")
    assert sorted(line.split(" ", 1)[1] for line in lines) == ['Name="interop"',
                                                              'Name="root/virt"']


def test_ein_and_gi(interop, subprocess_server):
    lines = ok("ein", f"{interop}:CIM_Namespace")
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"127.0.0.1:{subprocess_server.port}/interop:CIM_Namespace.")
        inst = ok("-nl", "gi", f"http://{line}")
        assert inst[0] == line
        name = [x for x in inst if x.startswith("-Name=")]
        assert len(name) == 1 and name[0] in ('-Name="interop"', '-Name="root/virt"')
        assert '-CreationClassName="CIM_Namespace"' in inst


def test_gi_object_manager(interop):
    [path] = ok("ein", f"{interop}:CIM_ObjectManager")
    inst = ok("-nl", "gi", f"http://{path}")
    assert '-ElementName="cim-provider"' in inst
    desc = [x for x in inst if x.startswith("-Description=")]
    assert len(desc) == 1 and "version " in desc[0]


def test_errors_from_200_responses(interop, subprocess_server):
    fails("CIM_ERR_NOT_FOUND", "gi", f'{interop}:CIM_Namespace.CreationClassName="CIM_Namespace",'
          'Name="nope",ObjectManagerCreationClassName="CIM_ObjectManager",'
          'ObjectManagerName="cim-provider",SystemCreationClassName="VIRT_HostSystem",'
          'SystemName="x"')
    fails("CIM_ERR_INVALID_CLASS", "ei", f"{interop}:VIRT_NoSuchClass")
    fails("CIM_ERR_INVALID_NAMESPACE", "ecn",
          f"{subprocess_server.url}/root/nowhere:CIM_ManagedElement")
    [path] = ok("ein", f"{interop}:CIM_ObjectManager")
    fails("CIM_ERR_NOT_SUPPORTED", "di", f"http://{path}")       # read-only
    assert len(ok("ein", f"{interop}:CIM_Namespace")) == 2


def test_unescaped_ampersand_in_key_is_refused_and_server_survives(interop):
    """wbemcli does not escape '&' in keys: malformed XML, an HTTP 400."""
    r = wbemcli("gi", f'{interop}:CIM_Namespace.Name="a&b"')
    assert r.returncode != 0
    assert len(ok("ein", f"{interop}:CIM_Namespace")) == 2


# --- root/virt (in-process server with test providers) -------------------------------------

def test_ein_superclass(virt, inproc_server):
    lines = ok("ein", f"{virt}:CIM_ComputerSystem")
    assert len(lines) == 4
    for u in ws.GUEST_UUIDS:
        assert sum(f'Name="{u}"' in line for line in lines) == 1
    assert sum(line.split(":", 2)[2].startswith("VIRT_HostSystem.") for line in lines) == 1


def test_gi_guest(virt):
    inst = ok("-nl", "gi", guest(virt, 1))
    assert '-ElementName="guest-1"' in inst
    assert '-Caption="Guest 1 & <friends>"' in inst
    assert "-OperationalStatus=2,6" in inst
    assert "-InstallDate=20240102030405.123456+060" in inst
    assert f"-Generation={2**63 + 1}" in inst
    assert '-Roles="guest","number 1"' in inst
    assert not any(x.startswith("-Description") for x in inst)     # NULL: left out


def test_gi_every_type(virt):
    inst = ok("-nl", "gi", f'{virt}:VIRT_TestAllTypes.Id="full"')
    for line in ("-P_uint8=255", "-P_uint64=18446744073709551615",
                 "-P_sint64=-9223372036854775808", "-A_sint8=-1,127", "-P_real32=1.5",
                 "-A_real32=-0.25,INF", "-P_boolean=FALSE", "-A_boolean=TRUE,FALSE",
                 "-P_char16=\u00e9", "-P_datetime=20240102030405.123456+060",
                 '-P_ref=root/virt:VIRT_HostSystem.CreationClassName="VIRT_HostSystem",'
                 f'Name="{ws.TEST_HOST}"'):
        assert line in inst, line
    string = [x for x in inst if x.startswith("-P_string=")]
    assert string == ['-P_string="<tag a=\\"1\\"> & \'quoted\' \u00e9\u4e2d\u6587 \U0001F600"']
    emb = [x for x in inst if x.startswith("-P_embedded=")]
    assert len(emb) == 1 and "inner &amp; &lt;embedded&gt;" in emb[0]
    # the all-NULL instance ('&' in its key: wbemcli cannot ask for it with gi)
    lines = ok("ei", f"{virt}:VIRT_TestAllTypes")
    assert len(lines) == 3               # A_string's "line1\nline2" spans two lines
    assert lines[-1].endswith(':VIRT_TestAllTypes.Id="empty & <nulls>" Id="empty & <nulls>"')


def test_associators(virt, inproc_server):
    lines = ok("ain", f'{virt}:VIRT_HostSystem.CreationClassName="VIRT_HostSystem",'
               f'Name="{ws.TEST_HOST}"')
    assert len(lines) == 3
    assert all(line.startswith(f"{ws.TEST_HOST}/root/virt:VIRT_ComputerSystem.")
               for line in lines)
    lines = ok("-ar", "Dependent", "-arr", "Antecedent", "-ac", "CIM_HostedDependency",
               "ai", guest(virt, 0))
    assert len(lines) == 1
    assert lines[0].startswith(f"{ws.TEST_HOST}/root/virt:VIRT_HostSystem.")
    assert 'ElementName="the host"' in lines[0]
    assert ok("-ar", "Antecedent", "ai", guest(virt, 0)) == []
    assert ok("-arc", "VIRT_ComputerSystem", "ain", guest(virt, 0)) == []


def test_references(virt):
    lines = ok("rin", guest(virt, 2))
    assert len(lines) == 1 and ":VIRT_HostedDependency." in lines[0]
    assert ws.GUEST_UUIDS[2] in lines[0]
    lines = ok("ri", guest(virt, 2))
    assert len(lines) == 1 and f'Name="{ws.TEST_HOST}"' in lines[0]
    assert ok("-ar", "Antecedent", "rin", guest(virt, 2)) == []


def test_cm_untyped_parameters(virt, inproc_server):
    lines = ok("cm", guest(virt, 0),
               "RequestStateChange.RequestedState=3,TimeoutPeriod=00000000000010.000000:000")
    assert len(lines) == 1
    assert "RequestStateChange: 0" in lines[0]
    assert 'Job (reference): root/virt:CIM_ConcreteJob.InstanceID="job-1"' in lines[0]
    target, method, params = inproc_server.providers["guests"].calls[-1]
    assert method == "RequestStateChange" and target.keybindings["Name"] == ws.GUEST_UUIDS[0]
    assert isinstance(params["RequestedState"], Uint16) and params["RequestedState"] == 3
    assert params["TimeoutPeriod"] == CIMDateTime("00000000000010.000000:000")


def test_cm_return_value_only(virt):
    lines = ok("cm", guest(virt, 1), "RequestStateChange.RequestedState=10")
    assert "RequestStateChange: 4097" in lines[0] and "Job" not in lines[0]


def test_cm_errors(virt):
    fails("CIM_ERR_METHOD_NOT_FOUND", "cm", guest(virt, 0), "NoSuchMethod.X=1")
    fails("CIM_ERR_INVALID_PARAMETER", "cm", guest(virt, 0),
          "RequestStateChange.RequestedState=99999")
    fails("CIM_ERR_NOT_FOUND", "cm", f'{virt}:VIRT_ComputerSystem.'
          'CreationClassName="VIRT_ComputerSystem",Name="missing"',
          "RequestStateChange.RequestedState=2")


def test_write_operations_not_supported(virt):
    fails("CIM_ERR_NOT_SUPPORTED", "ci", f'{virt}:VIRT_ComputerSystem.'
          'CreationClassName="VIRT_ComputerSystem",Name="new"', 'ElementName="x"')
    fails("CIM_ERR_NOT_SUPPORTED", "di", guest(virt, 0))
    assert len(ok("ein", f"{virt}:VIRT_ComputerSystem")) == 3


def test_numeric_and_boolean_keys(virt, inproc_server):
    """wbemcli sends keys with VALUETYPE only: converted to the declared types."""
    lines = ok("ein", f"{virt}:{ws.KEYS_CLASS}")
    assert sorted(line.split(":", 2)[2] for line in lines) == sorted([
        f'{ws.KEYS_CLASS}.KStr="a",KU16=7,KS64=-5,KBool=TRUE',
        f'{ws.KEYS_CLASS}.KStr="a",KU16=7,KS64=-5,KBool=FALSE',
        f'{ws.KEYS_CLASS}.KStr="b&<c>",KU16=65535,KS64=4611686018427387904,KBool=TRUE'])
    for kbool, value in (("false", "value-1"), ("TRUE", "value-0")):
        inst = ok("-nl", "gi", f'{virt}:{ws.KEYS_CLASS}.KStr="a",KU16=7,KS64=-5,KBool={kbool}')
        assert f'-Value="{value}"' in inst
        assert "-KU16=7" in inst and "-KS64=-5" in inst
    fails("CIM_ERR_NOT_FOUND", "gi", f'{virt}:{ws.KEYS_CLASS}.KStr="a",KU16=8,KS64=-5,KBool=true')
