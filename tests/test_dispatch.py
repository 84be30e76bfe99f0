"""Dispatch without HTTP: parameter conversion, defaults, path normalization, error
mapping. The Dispatcher runs on parsed requests with the real repository and the test
providers; responses are parsed back with pywbem."""
from __future__ import annotations

import asyncio
import math

import pytest
import pywbem
from pywbem import (CIMClassName, CIMDateTime, CIMError, CIMInstanceName, Char16, Real32,
                    Real64, Sint8, Sint64, Uint8, Uint16, Uint64)
from pywbem._tupleparse import TupleParser

from cim_provider.wbem.dispatch import Dispatcher, OperationContext
from cim_provider.wbem.params import (convert_params as _convert_params,
                                        convert_value)
from cim_provider.wbem.provider import Provider, Registry
from cim_provider.wbem.pull import PullContexts
from cim_provider.wbem.request import CIMRequest, parse_request
from cim_provider.wbem.xmlparse import parse_tupletree

try:
    from tests.support import wbem_server as ws
except ImportError:
    from support import wbem_server as ws


# --- convert_value: strings (wbemcli) and typed values to the declared type --------------

CONVERSIONS = [
    ("255", "uint8", Uint8(255)), ("0x1F", "uint16", Uint16(31)), (" 7 ", "uint16", Uint16(7)),
    ("18446744073709551615", "uint64", Uint64(2**64 - 1)), ("-128", "sint8", Sint8(-128)),
    ("-9223372036854775808", "sint64", Sint64(-2**63)), (5, "uint8", Uint8(5)),
    ("1.5", "real32", Real32(1.5)), ("-1e300", "real64", Real64(-1e300)),
    ("INF", "real64", Real64(float("inf"))), (2, "real64", Real64(2.0)),
    ("true", "boolean", True), ("FALSE", "boolean", False), (True, "boolean", True),
    ("abc", "string", "abc"), ("", "string", ""), ("x", "char16", Char16("x")),
    ("20240102030405.000000+000", "datetime", CIMDateTime("20240102030405.000000+000")),
    ("00000001000000.000000:000", "datetime", CIMDateTime("00000001000000.000000:000")),
]


@pytest.mark.parametrize("value,cimtype,expected", CONVERSIONS,
                         ids=[f"{c[1]}-{c[0]!r}" for c in CONVERSIONS])
def test_convert_value(value, cimtype, expected):
    got = convert_value(value, cimtype, False, "P")
    assert got == expected
    assert type(got) is type(expected)


def test_convert_array_and_nan():
    assert convert_value(["1", "2"], "uint16", True, "A") == [Uint16(1), Uint16(2)]
    assert convert_value("3", "uint16", True, "A") == [Uint16(3)]     # scalar for an array
    assert math.isnan(convert_value("NaN", "real32", False, "R"))
    assert convert_value(None, "uint8", False, "N") is None


@pytest.mark.parametrize("value,cimtype", [
    ("256", "uint8"), ("-1", "uint32"), ("1.5", "uint16"), ("ten", "sint32"),
    (True, "uint8"), ("yes", "boolean"), (1, "boolean"), ("ab", "char16"), ("", "char16"),
    ("2024", "datetime"), ("x", "real64"), (True, "real32"), (True, "string"),
    ("path", "reference"), (["1"], "uint8"),
])
def test_convert_value_rejects(value, cimtype):
    with pytest.raises(CIMError) as exc:
        convert_value(value, cimtype, False, "Param")
    assert exc.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "Param" in exc.value.status_description


# --- intrinsic parameters: names, defaults, NULL, required --------------------------------

def test_defaults_are_dsp0200s():
    p = _convert_params("GetClass", {"ClassName": "CIM_Foo"})
    assert p == {"ClassName": "CIM_Foo", "LocalOnly": True, "IncludeQualifiers": True,
                 "IncludeClassOrigin": False, "PropertyList": None}
    p = _convert_params("EnumerateInstances", {"classname": "CIM_Foo"})
    assert p["DeepInheritance"] is True and p["IncludeClassOrigin"] is False
    p = _convert_params("EnumerateClasses", {})
    assert p["DeepInheritance"] is False and p["LocalOnly"] is True
    p = _convert_params("OpenEnumerateInstances", {"ClassName": "X"})
    assert p["MaxObjectCount"] == 0 and p["OperationTimeout"] is None


def test_null_parameter_means_default():
    p = _convert_params("EnumerateInstances", {"ClassName": "X", "DeepInheritance": None,
                                               "PropertyList": None})
    assert p["DeepInheritance"] is True and p["PropertyList"] is None


def test_values_converted():
    p = _convert_params("OpenEnumerateInstances", {
        "ClassName": CIMClassName("X"), "DeepInheritance": "false", "MaxObjectCount": "5",
        "PropertyList": "Name", "OperationTimeout": "30"})
    assert p["ClassName"] == "X" and p["DeepInheritance"] is False
    assert p["MaxObjectCount"] == 5 and p["OperationTimeout"] == 30
    assert p["PropertyList"] == ["Name"]


@pytest.mark.parametrize("op,params", [
    ("GetClass", {}), ("GetInstance", {"InstanceName": None}),
    ("EnumerateInstances", {"ClassName": "X", "Bogus": "1"}),
    ("EnumerateInstances", {"ClassName": "X", "LocalOnly": "perhaps"}),
    ("GetInstance", {"InstanceName": "not a path"}),
    ("PullInstancesWithPath", {"EnumerationContext": "c", "MaxObjectCount": "-1"}),
    ("PullInstancesWithPath", {"EnumerationContext": "c", "MaxObjectCount": str(2**32)}),
    ("EnumerateInstances", {"ClassName": "X", "PropertyList": [CIMClassName("Y")]}),
])
def test_parameter_errors(op, params):
    with pytest.raises(CIMError) as exc:
        _convert_params(op, params)
    assert exc.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER


# --- the Dispatcher on parsed requests ------------------------------------------------------

class Exploding(Provider):
    namespace = "root/virt"
    classnames = ("VIRT_VirtualSystemSettingData",)

    async def enumerate_instances(self, classname):
        raise RuntimeError("secret internal detail /etc/shadow")


@pytest.fixture(scope="module")
def dispatcher():
    repo = ws.test_repository()
    registry = Registry()
    provs = ws.make_test_providers(repo)
    for p in list(provs.values()) + [Exploding()]:
        registry.add(p)
    d = Dispatcher(repo, registry, "disp.example", PullContexts())
    d.test_providers = provs
    return d


def run(dispatcher, req: CIMRequest, ctx: OperationContext | None = None):
    pieces = asyncio.run(dispatcher.handle(req, ctx or OperationContext(client="test")))
    xml = "".join(pieces)
    assert "/>" not in xml
    tree = parse_tupletree(xml.encode())
    rsp = tree[2][0][2][0][2][0]
    return rsp, xml


def error_of(rsp) -> tuple[int, str] | None:
    for kid in rsp[2]:
        if isinstance(kid, tuple) and kid[0] == "ERROR":
            return int(kid[1]["CODE"]), kid[1]["DESCRIPTION"]
    return None


def test_provider_exception_is_cim_err_failed_without_details(dispatcher):
    req = CIMRequest("1", True, "EnumerateInstances", "root/virt",
                     {"ClassName": CIMClassName("CIM_SettingData")})
    rsp, xml = run(dispatcher, req)
    code, desc = error_of(rsp)
    assert code == pywbem.CIM_ERR_FAILED
    assert "secret" not in xml and "Traceback" not in xml and "shadow" not in xml


def test_response_echoes_method_name_and_id(dispatcher):
    req = CIMRequest("msg-77", True, "enumerateINSTANCEnames", "ROOT/VIRT",
                     {"classname": CIMClassName("cim_system")})
    rsp, xml = run(dispatcher, req)
    assert rsp[1] == {"NAME": "enumerateINSTANCEnames"}
    assert 'ID="msg-77"' in xml
    assert error_of(rsp) is None
    names = [TupleParser().parse_any(k) for k in rsp[2][0][2]]
    assert {n.keybindings["Name"] for n in names} == set(ws.GUEST_UUIDS) | {ws.TEST_HOST}


def test_get_instance_normalizes_keys(dispatcher):
    """Key names in any case, reference keys in any form: the provider gets exact ones."""
    host = CIMInstanceName("virt_hostsystem", {"name": ws.TEST_HOST,
                                               "creationclassname": "VIRT_HostSystem"})
    guest = CIMInstanceName("VIRT_COMPUTERSYSTEM", {"NAME": ws.GUEST_UUIDS[0],
                                                    "CreationClassName": "VIRT_ComputerSystem"},
                            namespace="root/virt")
    path = CIMInstanceName("virt_hosteddependency", {"antecedent": host, "DEPENDENT": guest})
    norm = dispatcher.normalize_path(dispatcher.repo.namespace("root/virt"), path)
    assert norm.classname == "VIRT_HostedDependency" and norm.namespace == "root/virt"
    assert list(norm.keybindings) == ["Antecedent", "Dependent"]
    assert norm.keybindings["Antecedent"] == ws.host_path()
    assert norm.keybindings["Dependent"] == ws.guest_path(ws.GUEST_UUIDS[0])
    req = CIMRequest("2", True, "GetInstance", "root/virt", {"InstanceName": path})
    rsp, _ = run(dispatcher, req)
    assert error_of(rsp) is None
    inst = TupleParser().parse_any(rsp[2][0][2][0])
    assert inst.classname == "VIRT_HostedDependency"


@pytest.mark.parametrize("keys", [
    {"Name": ws.GUEST_UUIDS[0]},                                        # missing key
    {"Name": ws.GUEST_UUIDS[0], "CreationClassName": "VIRT_ComputerSystem", "Extra": "x"},
    {"Name": ws.GUEST_UUIDS[0], "name": ws.GUEST_UUIDS[0]},             # given twice
    {"Name": 5, "CreationClassName": "VIRT_ComputerSystem"},            # wrong type
])
def test_bad_keys_are_not_found(dispatcher, keys):
    path = CIMInstanceName("VIRT_ComputerSystem", keys, namespace="root/virt")
    req = CIMRequest("3", True, "GetInstance", "root/virt", {"InstanceName": path})
    rsp, _ = run(dispatcher, req)
    assert error_of(rsp)[0] == pywbem.CIM_ERR_NOT_FOUND


def test_extrinsic_needs_operator_role(dispatcher):
    body = (b'<?xml version="1.0"?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="5" '
            b'PROTOCOLVERSION="1.0"><SIMPLEREQ><METHODCALL NAME="Echo"><LOCALCLASSPATH>'
            b'<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virt"/>'
            b'</LOCALNAMESPACEPATH><CLASSNAME NAME="VIRT_TestAllTypes"/></LOCALCLASSPATH>'
            b'<PARAMVALUE NAME="In_uint8"><VALUE>1</VALUE></PARAMVALUE>'
            b'</METHODCALL></SIMPLEREQ></MESSAGE></CIM>')
    req = parse_request(body)
    rsp, _ = run(dispatcher, req, OperationContext(client="c", user="bob", role="reader"))
    assert rsp[0] == "METHODRESPONSE"
    assert error_of(rsp)[0] == pywbem.CIM_ERR_ACCESS_DENIED
    rsp, xml = run(dispatcher, req)
    assert error_of(rsp) is None
    assert '<RETURNVALUE PARAMTYPE="uint32"><VALUE>1</VALUE></RETURNVALUE>' in xml
    # NULL output parameter left out, the others typed as declared
    assert 'NAME="Out_null"' not in xml
    assert '<PARAMVALUE NAME="Out_uint64" PARAMTYPE="uint64">' in xml


def test_pull_contexts_are_per_client(dispatcher):
    req = CIMRequest("6", True, "OpenEnumerateInstancePaths", "root/virt",
                     {"ClassName": CIMClassName("CIM_System"), "MaxObjectCount": "1"})
    rsp, xml = run(dispatcher, req, OperationContext(client="alice"))
    params = {k[1]["NAME"]: k for k in rsp[2] if isinstance(k, tuple) and k[0] == "PARAMVALUE"}
    assert set(params) == {"EndOfSequence", "EnumerationContext"}
    ctx_id = TupleParser().parse_any(params["EnumerationContext"])[2]
    pull = CIMRequest("7", True, "PullInstancePaths", "root/virt",
                      {"EnumerationContext": ctx_id, "MaxObjectCount": "10"})
    rsp, _ = run(dispatcher, pull, OperationContext(client="mallory"))
    assert error_of(rsp)[0] == pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT
    rsp, xml = run(dispatcher, pull, OperationContext(client="alice"))
    assert error_of(rsp) is None and xml.count("<INSTANCEPATH>") == 3


def test_unknown_and_unsupported_intrinsics(dispatcher):
    for method in ("NoSuchOperation", "CreateClass", "deleteclass", "SetQualifier"):
        rsp, _ = run(dispatcher, CIMRequest("8", True, method, "root/virt", {}))
        assert error_of(rsp)[0] == pywbem.CIM_ERR_NOT_SUPPORTED, method


def test_namespace_checked_before_parameters(dispatcher):
    rsp, _ = run(dispatcher, CIMRequest("9", True, "EnumerateInstances", "root/nowhere",
                                        {"Bogus": "1"}))
    assert error_of(rsp)[0] == pywbem.CIM_ERR_INVALID_NAMESPACE
