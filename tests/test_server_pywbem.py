"""Every operation of issue 2 with pywbem against the real server on loopback.

interop is served by `cim-provider serve` in a subprocess (the production providers);
root/virt by an in-process server with test providers (host, three guests,
HostedDependency, VIRT_TestAllTypes), see tests/support/wbem_server.py.
"""
from __future__ import annotations

import http.client
import re
import time

import pytest
import pywbem
from pywbem import (CIMClass, CIMClassName, CIMDateTime, CIMError, CIMInstance,
                    CIMInstanceName, CIMQualifierDeclaration, Uint16, Uint32)
from pywbem._tupleparse import TupleParser

try:
    from tests.support import wbem_server as ws
    from tests.conftest import connect
except ImportError:
    from support import wbem_server as ws
    from conftest import connect

VIRT = "root/virt"


def cim_error(code: int, fn, *args, **kwargs) -> CIMError:
    with pytest.raises(CIMError) as exc:
        fn(*args, **kwargs)
    assert exc.value.status_code == code, (exc.value.status_code_name,
                                           exc.value.status_description)
    assert len(exc.value.status_description or "") < 1000
    return exc.value


def names(paths) -> set[str]:
    return {p.keybindings["Name"] for p in paths}


GUESTS = set(ws.GUEST_UUIDS)
ALL_SYSTEMS = GUESTS | {ws.TEST_HOST}


# --- classes and qualifiers (interop, subprocess server) -----------------------------------

class TestClasses:
    def test_enumerate_class_names_top_level(self, interop_conn):
        top = set(interop_conn.EnumerateClassNames())
        assert "CIM_ManagedElement" in top
        assert "CIM_Namespace" not in top          # not a root class

    def test_enumerate_class_names_deep(self, interop_conn):
        deep = set(interop_conn.EnumerateClassNames(DeepInheritance=True))
        assert {"CIM_Namespace", "CIM_ObjectManager", "VIRT_RegisteredProfile",
                "CIM_ManagedElement"} <= deep

    def test_enumerate_class_names_subclasses(self, interop_conn):
        direct = set(interop_conn.EnumerateClassNames(ClassName="CIM_ManagedElement"))
        assert "CIM_ManagedSystemElement" in direct
        assert "CIM_ObjectManager" not in direct and "CIM_ManagedElement" not in direct
        deep = set(interop_conn.EnumerateClassNames(ClassName="CIM_ManagedElement",
                                                    DeepInheritance=True))
        assert "CIM_ObjectManager" in deep and direct <= deep
        assert interop_conn.EnumerateClassNames(ClassName="VIRT_RegisteredProfile") == []

    def test_enumerate_classes(self, interop_conn):
        classes = interop_conn.EnumerateClasses(DeepInheritance=True, LocalOnly=False,
                                                IncludeQualifiers=True)
        by_name = {c.classname: c for c in classes}
        ns = by_name["CIM_Namespace"]
        assert isinstance(ns, CIMClass) and ns.superclass == "CIM_ManagedElement"
        assert "ElementName" in ns.properties and "Name" in ns.properties
        assert "Description" in ns.qualifiers
        assert ns.properties["Name"].qualifiers["Key"].value is True

    def test_enumerate_classes_local_only_no_qualifiers(self, interop_conn):
        classes = interop_conn.EnumerateClasses(ClassName="CIM_ManagedElement",
                                                DeepInheritance=True, LocalOnly=True,
                                                IncludeQualifiers=False,
                                                IncludeClassOrigin=True)
        ns = next(c for c in classes if c.classname == "CIM_Namespace")
        assert not ns.qualifiers
        assert "ElementName" not in ns.properties         # inherited: not local
        assert ns.properties["Name"].class_origin == "CIM_Namespace"
        assert all(not p.qualifiers for p in ns.properties.values())

    def test_get_class_full(self, interop_conn):
        from cim_provider.wbem.repository import Repository
        repo_cls = Repository.load().namespace("interop").get("CIM_Namespace")
        cls = interop_conn.GetClass("CIM_Namespace", LocalOnly=False, IncludeQualifiers=True,
                                    IncludeClassOrigin=True)
        assert cls.classname == "CIM_Namespace" and cls.superclass == repo_cls.superclass
        assert set(cls.properties) == set(repo_cls.properties)
        assert set(cls.methods) == set(repo_cls.methods)
        assert cls.properties["ElementName"].class_origin == "CIM_ManagedElement"
        assert cls.properties["ElementName"].propagated is True
        assert cls.properties["Name"].propagated is False
        assert cls.qualifiers["Description"].value == repo_cls.qualifiers["Description"].value

    def test_get_class_defaults(self, interop_conn):
        """DSP0200 defaults: LocalOnly=true, IncludeQualifiers=true, no class origin."""
        cls = interop_conn.GetClass("CIM_Namespace")
        assert "Name" in cls.properties and "ElementName" not in cls.properties
        assert "Description" in cls.qualifiers
        assert all(p.class_origin is None for p in cls.properties.values())

    def test_get_class_without_qualifiers(self, interop_conn):
        cls = interop_conn.GetClass("CIM_ObjectManager", LocalOnly=False,
                                    IncludeQualifiers=False)
        assert not cls.qualifiers
        assert cls.properties and all(not p.qualifiers for p in cls.properties.values())
        assert cls.methods and all(not m.qualifiers for m in cls.methods.values())
        assert all(not prm.qualifiers for m in cls.methods.values()
                   for prm in m.parameters.values())
        full = interop_conn.GetClass("CIM_ObjectManager", LocalOnly=False)
        m = full.methods["RequestStateChange"]
        assert m.qualifiers and m.parameters["RequestedState"].qualifiers["IN"].value is True

    def test_get_class_property_list_and_case(self, interop_conn):
        cls = interop_conn.GetClass("cim_namespace", LocalOnly=False,
                                    PropertyList=["name", "ElementName"])
        assert cls.classname == "CIM_Namespace"
        assert set(cls.properties) == {"Name", "ElementName"}

    def test_get_class_unknown(self, interop_conn):
        cim_error(pywbem.CIM_ERR_NOT_FOUND, interop_conn.GetClass, "VIRT_NoSuchClass")

    def test_get_qualifier(self, interop_conn):
        q = interop_conn.GetQualifier("Key")
        assert isinstance(q, CIMQualifierDeclaration)
        assert q.name == "Key" and q.type == "boolean" and q.scopes["PROPERTY"]
        assert q.overridable is False
        cim_error(pywbem.CIM_ERR_NOT_FOUND, interop_conn.GetQualifier, "NoSuchQualifier")

    def test_enumerate_qualifiers(self, interop_conn):
        quals = {q.name: q for q in interop_conn.EnumerateQualifiers()}
        assert {"Key", "Description", "Abstract", "Association", "ValueMap"} <= set(quals)
        assert quals["ValueMap"].is_array and quals["ValueMap"].type == "string"


# --- instances ---------------------------------------------------------------------------

class TestInteropInstances:
    def test_namespaces(self, interop_conn):
        insts = interop_conn.EnumerateInstances("CIM_Namespace")
        assert {i["Name"] for i in insts} == {"root/virt", "interop"}
        for i in insts:
            assert i.path.namespace == "interop"
            assert i["CreationClassName"] == "CIM_Namespace"
            assert i["ObjectManagerName"] == "cim-provider"

    def test_names_and_get(self, interop_conn):
        paths = interop_conn.EnumerateInstanceNames("CIM_Namespace")
        assert len(paths) == 2
        for p in paths:
            inst = interop_conn.GetInstance(p)
            assert inst.path.keybindings == p.keybindings
            assert inst["Name"] == p.keybindings["Name"]

    def test_object_manager(self, interop_conn):
        oms = interop_conn.EnumerateInstances("CIM_ObjectManager")
        assert len(oms) == 1
        assert oms[0]["ElementName"] == "cim-provider"
        assert re.search(r"version \d+\.\d+\.\d+$", oms[0]["Description"])

    def test_superclass_enumeration(self, interop_conn):
        insts = interop_conn.EnumerateInstances("CIM_ManagedElement")
        classes = [i.classname for i in insts]
        assert classes.count("CIM_Namespace") == 2 and classes.count("CIM_ObjectManager") == 1
        deep = set(interop_conn.EnumerateClassNames(ClassName="CIM_ManagedElement",
                                                    DeepInheritance=True))
        assert set(classes) <= deep

    def test_get_instance_unknown_key_value(self, interop_conn):
        p = interop_conn.EnumerateInstanceNames("CIM_Namespace")[0].copy()
        p.keybindings["Name"] = "root/nowhere"
        cim_error(pywbem.CIM_ERR_NOT_FOUND, interop_conn.GetInstance, p)

    def test_get_instance_wrong_keys(self, interop_conn):
        p = CIMInstanceName("CIM_Namespace", {"Name": "interop"}, namespace="interop")
        cim_error(pywbem.CIM_ERR_NOT_FOUND, interop_conn.GetInstance, p)


class TestVirtInstances:
    def test_superclass_returns_subclass_instances(self, virt_conn):
        insts = virt_conn.EnumerateInstances("CIM_ComputerSystem")
        assert sorted(i.classname for i in insts) == ["VIRT_ComputerSystem"] * 3 + \
            ["VIRT_HostSystem"]
        assert names(i.path for i in insts) == ALL_SYSTEMS
        assert all(i.path.namespace == VIRT for i in insts)
        assert names(virt_conn.EnumerateInstanceNames("CIM_System")) == ALL_SYSTEMS
        assert names(virt_conn.EnumerateInstanceNames("VIRT_ComputerSystem")) == GUESTS

    def test_enumerate_leaf_class_only(self, virt_conn):
        insts = virt_conn.EnumerateInstances("VIRT_HostSystem")
        assert [i["Name"] for i in insts] == [ws.TEST_HOST]

    def test_values_match_provider(self, virt_conn, inproc_server):
        want = {i.path.keybindings["Name"]: i for i in inproc_server.providers["guests"].instances}
        for inst in virt_conn.EnumerateInstances("VIRT_ComputerSystem"):
            src = want[inst["Name"]]
            assert set(inst.properties) == set(src.properties)
            for name, prop in src.properties.items():
                assert inst.properties[name].value == prop.value, name
                assert inst.properties[name].type == prop.type, name
        assert "Description" not in inst.properties        # None values are left out

    def test_every_cim_type(self, virt_conn):
        inst = virt_conn.GetInstance(ws.alltypes_path("full"))
        for name, value in ws.alltypes_values().items():
            prop = inst.properties[name]
            if name == "P_embedded":
                assert isinstance(prop.value, CIMInstance)
                assert prop.embedded_object == "instance"
                assert prop.value["ElementName"] == value["ElementName"]
                assert prop.value["Generation"] == value["Generation"]
                continue
            if name == "P_ref":
                assert prop.type == "reference"
                assert prop.value.keybindings == value.keybindings
                assert prop.value.namespace == VIRT
                continue
            assert prop.value == value, name
            decl = ws.alltypes_class(CIMClass("CIM_ManagedElement")).properties.get(name)
            if decl is not None:
                assert prop.type == decl.type, name
                assert prop.is_array == decl.is_array, name

    def test_all_null_instance(self, virt_conn):
        inst = virt_conn.GetInstance(ws.alltypes_path("empty & <nulls>"))
        assert dict(inst.items()) == {"Id": "empty & <nulls>"}

    def test_property_list(self, virt_conn):
        path = ws.guest_path(ws.GUEST_UUIDS[0])
        inst = virt_conn.GetInstance(path, PropertyList=["ElementName", "enabledstate", "Nope"])
        assert set(inst.properties) == {"ElementName", "EnabledState"}
        assert inst["ElementName"] == "guest-0"
        assert inst.path.keybindings["Name"] == ws.GUEST_UUIDS[0]
        inst = virt_conn.GetInstance(path, PropertyList=[])
        assert not inst.properties
        insts = virt_conn.EnumerateInstances("CIM_ComputerSystem", PropertyList=["Name"])
        assert all(set(i.properties) == {"Name"} for i in insts) and len(insts) == 4

    def test_deep_inheritance(self, virt_conn):
        from cim_provider.wbem.repository import Repository
        base = set(Repository.load().namespace(VIRT).get("CIM_ManagedElement").properties)
        shallow = virt_conn.EnumerateInstances("CIM_ManagedElement", DeepInheritance=False)
        deep = virt_conn.EnumerateInstances("CIM_ManagedElement", DeepInheritance=True)
        # systems, alltypes, keys (associations are not CIM_ManagedElement)
        assert len(shallow) == len(deep) == 4 + 2 + len(ws.KEYS_INSTANCES)
        for inst in shallow:
            assert set(inst.properties) <= base, inst.classname
        guest = next(i for i in shallow if i.classname == "VIRT_ComputerSystem")
        assert "ElementName" in guest.properties and "Name" not in guest.properties
        guest = next(i for i in deep if i.classname == "VIRT_ComputerSystem")
        assert "Name" in guest.properties and "EnabledState" in guest.properties

    def test_include_class_origin(self, virt_conn):
        path = ws.guest_path(ws.GUEST_UUIDS[1])
        inst = virt_conn.GetInstance(path, IncludeClassOrigin=True)
        assert inst.properties["ElementName"].class_origin == "CIM_ManagedElement"
        assert inst.properties["EnabledState"].class_origin == "CIM_EnabledLogicalElement"
        inst = virt_conn.GetInstance(path)
        assert all(p.class_origin is None for p in inst.properties.values())
        insts = virt_conn.EnumerateInstances("VIRT_ComputerSystem", IncludeClassOrigin=True)
        assert all(i.properties["Name"].class_origin == "CIM_ManagedSystemElement"
                   for i in insts)

    def test_no_qualifiers_on_instances(self, virt_conn):
        inst = virt_conn.GetInstance(ws.guest_path(ws.GUEST_UUIDS[0]), IncludeQualifiers=True)
        assert not inst.qualifiers

    def test_keys_converted_to_declared_types(self, virt_conn):
        """Case-insensitive key names, any class-name case: still found."""
        p = CIMInstanceName("virt_computersystem", {"name": ws.GUEST_UUIDS[2],
                                                    "CREATIONCLASSNAME": "VIRT_ComputerSystem"},
                            namespace="ROOT/VIRT")
        inst = virt_conn.GetInstance(p)
        assert inst["ElementName"] == "guest-2"
        assert inst.classname == "VIRT_ComputerSystem"

    @pytest.mark.parametrize("keys,value", [
        ({"KStr": "a", "KU16": Uint16(7), "KS64": pywbem.Sint64(-5), "KBool": True}, "value-0"),
        ({"KStr": "a", "KU16": 7, "KS64": -5, "KBool": False}, "value-1"),
        ({"kstr": "a", "ku16": "7", "ks64": "-5", "kbool": "FALSE"}, "value-1"),
        ({"KStr": "b&<c>", "KU16": "0xFFFF", "KS64": str(2**62), "KBool": "true"}, "value-2"),
    ], ids=["typed", "untyped-ints", "strings", "hex-and-escaping"])
    def test_keys_of_every_kind(self, virt_conn, keys, value):
        inst = virt_conn.GetInstance(CIMInstanceName(ws.KEYS_CLASS, keys, namespace=VIRT))
        assert inst["Value"] == value
        assert isinstance(inst["KU16"], Uint16) and isinstance(inst["KBool"], bool)

    @pytest.mark.parametrize("keys", [
        {"KStr": "a", "KU16": "seven", "KS64": -5, "KBool": True},
        {"KStr": "a", "KU16": 70000, "KS64": -5, "KBool": True},
        {"KStr": "a", "KU16": "7.0", "KS64": -5, "KBool": True},
        {"KStr": "a", "KU16": 7, "KS64": -5, "KBool": "maybe"},
        {"KStr": "a", "KU16": 8, "KS64": -5, "KBool": True},
        {"KStr": "A", "KU16": 7, "KS64": -5, "KBool": True},
    ], ids=["not-a-number", "out-of-range", "real", "bad-boolean", "no-such-value",
            "string-keys-are-case-sensitive"])
    def test_bad_key_values_are_not_found(self, virt_conn, keys):
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.GetInstance,
                  CIMInstanceName(ws.KEYS_CLASS, keys, namespace=VIRT))

    def test_get_instance_unknown(self, virt_conn):
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.GetInstance, ws.guest_path("nope"))
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.GetInstance,
                  CIMInstanceName("VIRT_ComputerSystem", {"Name": ws.GUEST_UUIDS[0]},
                                  namespace=VIRT))
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.GetInstance,
                  CIMInstanceName("VIRT_VirtualSystemSettingData", {"InstanceID": "x"},
                                  namespace=VIRT))

    def test_get_instance_unknown_class(self, virt_conn):
        cim_error(pywbem.CIM_ERR_INVALID_CLASS, virt_conn.GetInstance,
                  CIMInstanceName("VIRT_Nope", {"Name": "x"}, namespace=VIRT))


# --- associations ----------------------------------------------------------------------

def _guest(i: int = 0) -> CIMInstanceName:
    return ws.guest_path(ws.GUEST_UUIDS[i])


class TestAssociations:
    def test_associators_from_guest(self, virt_conn):
        insts = virt_conn.Associators(_guest(0))
        assert [i.classname for i in insts] == ["VIRT_HostSystem"]
        assert insts[0]["ElementName"] == "the host"
        assert insts[0].path.namespace == VIRT and insts[0].path.host == ws.TEST_HOST

    def test_associator_names_from_host(self, virt_conn):
        paths = virt_conn.AssociatorNames(ws.host_path())
        assert names(paths) == GUESTS
        assert all(p.namespace == VIRT and p.host == ws.TEST_HOST for p in paths)

    @pytest.mark.parametrize("kw,expect", [
        ({"AssocClass": "CIM_HostedDependency"}, True),
        ({"AssocClass": "CIM_Dependency"}, True),
        ({"AssocClass": "VIRT_HostedDependency"}, True),
        ({"AssocClass": "CIM_Component"}, False),
        ({"ResultClass": "CIM_System"}, True),
        ({"ResultClass": "VIRT_HostSystem"}, True),
        ({"ResultClass": "VIRT_ComputerSystem"}, False),
        ({"Role": "Dependent"}, True),
        ({"Role": "dependent"}, True),
        ({"Role": "Antecedent"}, False),
        ({"ResultRole": "Antecedent"}, True),
        ({"ResultRole": "Dependent"}, False),
        ({"Role": "Dependent", "ResultRole": "Antecedent", "AssocClass": "CIM_Dependency",
          "ResultClass": "CIM_ComputerSystem"}, True),
    ])
    def test_associator_filters_from_guest(self, virt_conn, kw, expect):
        paths = virt_conn.AssociatorNames(_guest(1), **kw)
        insts = virt_conn.Associators(_guest(1), **kw)
        want = {ws.TEST_HOST} if expect else set()
        assert names(paths) == want
        assert names(i.path for i in insts) == want

    @pytest.mark.parametrize("kw,expect", [
        ({"Role": "Antecedent"}, True), ({"Role": "Dependent"}, False),
        ({"ResultRole": "Dependent"}, True), ({"ResultRole": "Antecedent"}, False),
        ({"ResultClass": "VIRT_ComputerSystem"}, True), ({"ResultClass": "VIRT_HostSystem"}, False),
    ])
    def test_associator_filters_from_host(self, virt_conn, kw, expect):
        assert names(virt_conn.AssociatorNames(ws.host_path(), **kw)) == \
            (GUESTS if expect else set())

    def test_associators_property_list_and_class_origin(self, virt_conn):
        insts = virt_conn.Associators(ws.host_path(), PropertyList=["ElementName"],
                                      IncludeClassOrigin=True)
        assert len(insts) == 3
        for i in insts:
            assert set(i.properties) == {"ElementName"}
            assert i.properties["ElementName"].class_origin == "CIM_ManagedElement"

    def test_references(self, virt_conn):
        refs = virt_conn.References(_guest(2))
        assert [r.classname for r in refs] == ["VIRT_HostedDependency"]
        assert refs[0]["Dependent"].keybindings == _guest(2).keybindings
        assert refs[0]["Antecedent"].keybindings == ws.host_path().keybindings
        assert refs[0].path.namespace == VIRT and refs[0].path.host == ws.TEST_HOST
        assert len(virt_conn.References(ws.host_path())) == 3

    @pytest.mark.parametrize("kw,count", [
        ({}, 3), ({"ResultClass": "CIM_Dependency"}, 3), ({"ResultClass": "CIM_Component"}, 0),
        ({"Role": "Antecedent"}, 3), ({"Role": "Dependent"}, 0),
    ])
    def test_reference_names_filters(self, virt_conn, kw, count):
        paths = virt_conn.ReferenceNames(ws.host_path(), **kw)
        assert len(paths) == count
        for p in paths:
            assert p.classname == "VIRT_HostedDependency" and p.namespace == VIRT
            assert p.keybindings["Antecedent"].keybindings == ws.host_path().keybindings

    def test_references_property_list(self, virt_conn):
        refs = virt_conn.References(ws.host_path(), PropertyList=["Dependent"])
        assert all(set(r.properties) == {"Dependent"} for r in refs)

    def test_association_errors(self, virt_conn):
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.Associators, ws.guest_path("missing"))
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.ReferenceNames, ws.guest_path("missing"))
        cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, virt_conn.AssociatorNames, _guest(0),
                  AssocClass="VIRT_NoSuchAssoc")
        cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, virt_conn.AssociatorNames, _guest(0),
                  ResultClass="VIRT_NoSuchClass")
        cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE, virt_conn.Associators,
                  CIMInstanceName("VIRT_HostSystem", ws.host_path().keybindings,
                                  namespace="root/nowhere"))

    def test_association_instances_enumerate(self, virt_conn):
        insts = virt_conn.EnumerateInstances("CIM_HostedDependency")
        assert len(insts) == 3
        for i in insts:
            assert i["Antecedent"].namespace == VIRT
        path = insts[0].path
        got = virt_conn.GetInstance(path)
        assert got["Dependent"].keybindings == insts[0]["Dependent"].keybindings


# --- extrinsic methods -------------------------------------------------------------------

class TestInvokeMethod:
    def test_typed_parameters(self, virt_conn, inproc_server):
        rv, out = virt_conn.InvokeMethod(
            "RequestStateChange", _guest(0),
            [("RequestedState", Uint16(3)),
             ("TimeoutPeriod", CIMDateTime("00000000000010.000000:000"))])
        assert rv == 0 and isinstance(rv, Uint32)
        assert out["Job"].classname == "CIM_ConcreteJob"
        assert out["Job"].keybindings["InstanceID"] == "job-1"
        target, method, params = inproc_server.providers["guests"].calls[-1]
        assert method == "RequestStateChange"
        assert target.keybindings["Name"] == ws.GUEST_UUIDS[0]
        assert isinstance(params["RequestedState"], Uint16) and params["RequestedState"] == 3
        assert params["TimeoutPeriod"] == CIMDateTime("00000000000010.000000:000")

    def test_string_parameters_converted(self, virt_conn, inproc_server):
        rv, _out = virt_conn.InvokeMethod("requeststatechange", _guest(1),
                                          [("requestedstate", "4"),
                                           ("TimeoutPeriod", "00000000000005.000000:000")])
        assert rv == 0
        _t, method, params = inproc_server.providers["guests"].calls[-1]
        assert method == "RequestStateChange"
        assert set(params) == {"RequestedState", "TimeoutPeriod"}    # declared spelling
        assert isinstance(params["RequestedState"], Uint16) and params["RequestedState"] == 4
        assert isinstance(params["TimeoutPeriod"], CIMDateTime)

    def test_return_value_from_provider(self, virt_conn):
        rv, out = virt_conn.InvokeMethod("RequestStateChange", _guest(0),
                                         [("RequestedState", Uint16(11))])
        assert rv == 4097 and "Job" not in out          # NULL output parameter left out

    def test_every_type_as_strings(self, virt_conn, inproc_server):
        sent = {"In_uint8": "255", "In_uint16": "0x10", "In_uint32": "4294967295",
                "In_uint64": "18446744073709551615", "In_sint8": "-128", "In_sint16": "-2",
                "In_sint32": "7", "In_sint64": "-9223372036854775808", "In_real32": "1.5",
                "In_real64": "-2.5e10", "In_boolean": "TRUE", "In_string": "s & <t>",
                "In_char16": "\u00e9", "In_datetime": "20240102030405.123456+060",
                "InA_uint16": ["1", "2"], "InA_boolean": ["false", "true"],
                "InA_datetime": ["00000001020304.000005:000"], "InA_real64": ["INF", "-INF"],
                "InA_string": ["a", "b"]}
        rv, out = virt_conn.InvokeMethod("Echo", CIMClassName(ws.ALLTYPES_CLASS, namespace=VIRT),
                                         list(sent.items()))
        assert rv == len(sent)
        _t, _m, got = inproc_server.providers["alltypes"].calls[-1]
        assert set(got) == set(sent)
        for name in sent:
            t = name.split("_", 1)[1]
            v = got[name]
            for x in (v if isinstance(v, list) else [v]):
                assert pywbem.cimtype(x) == t, (name, x)
        assert got["In_uint16"] == 16
        assert got["In_uint64"] == 2**64 - 1 and got["In_sint64"] == -2**63
        assert got["In_real64"] == -2.5e10 and got["In_boolean"] is True
        assert got["InA_boolean"] == [False, True]
        assert got["InA_real64"] == [float("inf"), float("-inf")]
        assert got["In_datetime"] == CIMDateTime("20240102030405.123456+060")
        # output parameters: declared types, NULL left out
        assert isinstance(out["Out_uint64"], pywbem.Uint64) and out["Out_uint64"] == 2**64 - 1
        assert out["Out_ref"].keybindings == ws.host_path().keybindings
        assert "Out_null" not in out
        assert "In_uint16=Uint16:16" in out["Out_echo"]

    def test_reference_parameter(self, virt_conn, inproc_server):
        rv, _ = virt_conn.InvokeMethod("Echo", CIMClassName(ws.ALLTYPES_CLASS, namespace=VIRT),
                                       [("In_ref", _guest(2))])
        assert rv == 1
        got = inproc_server.providers["alltypes"].calls[-1][2]["In_ref"]
        assert isinstance(got, CIMInstanceName) and got.keybindings["Name"] == ws.GUEST_UUIDS[2]

    @pytest.mark.parametrize("params", [
        [("In_uint8", "256")], [("In_uint8", "-1")], [("In_sint8", "abc")],
        [("In_boolean", "yes")], [("In_datetime", "yesterday")], [("In_char16", "ab")],
        [("In_ref", "not a path")], [("In_uint8", ["1", "2"])], [("NoSuchParam", "1")],
        [("Out_echo", ["x"])],
    ], ids=["overflow", "negative-unsigned", "not-a-number", "bad-boolean", "bad-datetime",
            "long-char16", "string-for-ref", "array-for-scalar", "unknown-param", "output-param"])
    def test_invalid_parameters(self, virt_conn, params):
        cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, virt_conn.InvokeMethod, "Echo",
                  CIMClassName(ws.ALLTYPES_CLASS, namespace=VIRT), params)

    def test_method_errors(self, virt_conn):
        cim_error(pywbem.CIM_ERR_METHOD_NOT_FOUND, virt_conn.InvokeMethod, "NoSuchMethod",
                  _guest(0))
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.InvokeMethod, "RequestStateChange",
                  ws.guest_path("missing"), [("RequestedState", Uint16(2))])
        cim_error(pywbem.CIM_ERR_INVALID_CLASS, virt_conn.InvokeMethod, "Foo",
                  CIMClassName("VIRT_Nope", namespace=VIRT))
        cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, virt_conn.InvokeMethod, "SetPowerState",
                  _guest(0), [("PowerState", Uint32(1))])
        cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE, virt_conn.InvokeMethod, "RequestStateChange",
                  CIMInstanceName("VIRT_ComputerSystem", _guest(0).keybindings,
                                  namespace="root/nowhere"))

    def test_no_provider_for_class(self, virt_conn):
        cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, virt_conn.InvokeMethod, "DefineSystem",
                  CIMClassName("VIRT_VirtualSystemManagementService", namespace=VIRT))

    def test_untyped_paramvalues_over_raw_http(self, inproc_server):
        """wbemcli's form: no PARAMTYPE, keys with VALUETYPE only."""
        body = (
            '<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            '<MESSAGE ID="4711" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            '<METHODCALL NAME="RequestStateChange"><LOCALINSTANCEPATH><LOCALNAMESPACEPATH>'
            '<NAMESPACE NAME="root"></NAMESPACE><NAMESPACE NAME="virt"></NAMESPACE>'
            '</LOCALNAMESPACEPATH><INSTANCENAME CLASSNAME="VIRT_ComputerSystem">'
            '<KEYBINDING NAME="CreationClassName"><KEYVALUE VALUETYPE="string">'
            'VIRT_ComputerSystem</KEYVALUE></KEYBINDING><KEYBINDING NAME="Name">'
            f'<KEYVALUE VALUETYPE="string">{ws.GUEST_UUIDS[2]}</KEYVALUE></KEYBINDING>'
            '</INSTANCENAME></LOCALINSTANCEPATH>'
            '<PARAMVALUE NAME="RequestedState"><VALUE>2</VALUE></PARAMVALUE>'
            '<PARAMVALUE NAME="TimeoutPeriod"><VALUE>00000000000001.000000:000</VALUE>'
            '</PARAMVALUE></METHODCALL></SIMPLEREQ></MESSAGE></CIM>')
        conn = http.client.HTTPConnection("127.0.0.1", inproc_server.port, timeout=30)
        conn.request("POST", "/cimom", body.encode(), {
            "Content-Type": 'application/xml; charset="utf-8"', "CIMOperation": "MethodCall",
            "CIMMethod": "RequestStateChange",
            "CIMObject": "root%2Fvirt%3AVIRT_ComputerSystem.Name%3D%22x%22"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == 200, data
        assert resp.getheader("CIMOperation") == "MethodResponse"
        from cim_provider.wbem.xmlparse import parse_tupletree
        rsp = parse_tupletree(data)[2][0][2][0][2][0]
        assert rsp[0] == "METHODRESPONSE" and rsp[1]["NAME"] == "RequestStateChange"
        kids = [k for k in rsp[2] if isinstance(k, tuple)]
        assert kids[0][0] == "RETURNVALUE" and kids[0][1] == {"PARAMTYPE": "uint32"}
        assert TupleParser().parse_any(kids[0][2][0]) == "0"
        assert kids[1][0] == "PARAMVALUE" and set(kids[1][1]) <= {"NAME", "PARAMTYPE"}
        _t, _m, params = inproc_server.providers["guests"].calls[-1]
        assert params["RequestedState"] == 2 and isinstance(params["RequestedState"], Uint16)
        assert params["TimeoutPeriod"] == CIMDateTime("00000000000001.000000:000")


# --- pull operations ---------------------------------------------------------------------

def _drain(conn, pull, first, max_count=1):
    """Pull to the end, one object at a time; returns (items, number of pulls)."""
    items, eos, ctx = list(first[0]), first[1], first[2]
    pulls = 0
    while not eos:
        res = pull(ctx, MaxObjectCount=max_count)
        assert len(res[0]) <= max_count
        items.extend(res[0])
        eos, ctx = res[1], res[2]
        pulls += 1
        assert pulls < 100
    assert ctx is None
    return items, pulls


class TestPull:
    def test_open_enumerate_instances_one_at_a_time(self, virt_conn):
        first = virt_conn.OpenEnumerateInstances("CIM_ComputerSystem", MaxObjectCount=1)
        assert len(first.instances) == 1 and not first.eos
        items, pulls = _drain(virt_conn, virt_conn.PullInstancesWithPath, first)
        assert pulls == 3
        assert names(i.path for i in items) == ALL_SYSTEMS and len(items) == 4
        assert all(i.path.namespace == VIRT and i.path.host == ws.TEST_HOST for i in items)
        guest = next(i for i in items if i.classname == "VIRT_ComputerSystem")
        assert guest["HealthState"] == 5

    def test_open_enumerate_instances_property_list_deep(self, virt_conn):
        first = virt_conn.OpenEnumerateInstances("CIM_ManagedElement", MaxObjectCount=2,
                                                 DeepInheritance=False, IncludeClassOrigin=True,
                                                 PropertyList=["ElementName", "Name"])
        items, _ = _drain(virt_conn, virt_conn.PullInstancesWithPath, first, 2)
        assert len(items) == 4 + 2 + len(ws.KEYS_INSTANCES)
        for i in items:
            assert set(i.properties) <= {"ElementName"}      # Name is not in CIM_ManagedElement
            for p in i.properties.values():
                assert p.class_origin == "CIM_ManagedElement"

    def test_open_enumerate_instance_paths(self, virt_conn):
        first = virt_conn.OpenEnumerateInstancePaths("CIM_System", MaxObjectCount=1)
        items, pulls = _drain(virt_conn, virt_conn.PullInstancePaths, first)
        assert pulls == 3 and names(items) == ALL_SYSTEMS
        assert all(p.namespace == VIRT and p.host == ws.TEST_HOST for p in items)

    def test_open_everything_at_once(self, virt_conn):
        res = virt_conn.OpenEnumerateInstances("CIM_ComputerSystem", MaxObjectCount=100)
        assert res.eos and res.context is None and len(res.instances) == 4

    def test_open_zero_then_pull(self, virt_conn):
        res = virt_conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=0)
        assert res.paths == [] and not res.eos
        res2 = virt_conn.PullInstancePaths(res.context, MaxObjectCount=10)
        assert res2.eos and names(res2.paths) == ALL_SYSTEMS

    def test_open_associator_instances(self, virt_conn):
        first = virt_conn.OpenAssociatorInstances(ws.host_path(), MaxObjectCount=1,
                                                  ResultRole="Dependent")
        items, pulls = _drain(virt_conn, virt_conn.PullInstancesWithPath, first)
        assert pulls == 2 and names(i.path for i in items) == GUESTS
        assert all(i.classname == "VIRT_ComputerSystem" for i in items)
        res = virt_conn.OpenAssociatorInstances(ws.host_path(), ResultRole="Antecedent",
                                                MaxObjectCount=1)
        assert res.eos and res.instances == []

    def test_open_associator_instance_paths(self, virt_conn):
        first = virt_conn.OpenAssociatorInstancePaths(ws.host_path(), MaxObjectCount=1,
                                                      AssocClass="CIM_HostedDependency")
        items, _ = _drain(virt_conn, virt_conn.PullInstancePaths, first)
        assert names(items) == GUESTS
        assert all(p.host == ws.TEST_HOST and p.namespace == VIRT for p in items)

    def test_open_reference_instances(self, virt_conn):
        first = virt_conn.OpenReferenceInstances(ws.host_path(), MaxObjectCount=1,
                                                 Role="Antecedent")
        items, pulls = _drain(virt_conn, virt_conn.PullInstancesWithPath, first)
        assert pulls == 2 and len(items) == 3
        assert {i["Dependent"].keybindings["Name"] for i in items} == GUESTS

    def test_open_reference_instance_paths(self, virt_conn):
        first = virt_conn.OpenReferenceInstancePaths(_guest(0), MaxObjectCount=1)
        items, _ = _drain(virt_conn, virt_conn.PullInstancePaths, first)
        assert len(items) == 1 and items[0].classname == "VIRT_HostedDependency"

    def test_iter_operations(self, virt_conn):
        """pywbem's Iter* use pull operations first: they must not fall back."""
        conn = pywbem.WBEMConnection(virt_conn.url, default_namespace=VIRT, timeout=30,
                                     use_pull_operations=None)
        insts = list(conn.IterEnumerateInstances("CIM_ComputerSystem", MaxObjectCount=1))
        assert len(insts) == 4
        assert conn._use_enum_inst_pull_operations is True
        assert names(conn.IterAssociatorInstancePaths(ws.host_path(),
                                                      MaxObjectCount=1)) == GUESTS
        assert conn._use_assoc_path_pull_operations is True

    def test_close_enumeration(self, virt_conn):
        res = virt_conn.OpenEnumerateInstances("CIM_ComputerSystem", MaxObjectCount=1)
        virt_conn.CloseEnumeration(res.context)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.PullInstancesWithPath,
                  res.context, MaxObjectCount=1)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.CloseEnumeration,
                  res.context)

    def test_context_gone_after_end(self, virt_conn):
        res = virt_conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=1)
        ctx = res.context
        _drain(virt_conn, virt_conn.PullInstancePaths, res)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.PullInstancePaths,
                  ctx, MaxObjectCount=1)

    def test_unknown_context(self, virt_conn):
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.PullInstancesWithPath,
                  ("no-such-context", VIRT), MaxObjectCount=1)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.CloseEnumeration,
                  ("no-such-context", VIRT))

    def test_wrong_kind_of_context(self, virt_conn):
        res = virt_conn.OpenEnumerateInstances("CIM_ComputerSystem", MaxObjectCount=1)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.PullInstancePaths,
                  res.context, MaxObjectCount=1)
        # the failed pull did not consume it
        items, _ = _drain(virt_conn, virt_conn.PullInstancesWithPath, res)
        assert len(items) == 4

    def test_context_of_another_namespace(self, virt_conn):
        res = virt_conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=1)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.PullInstancePaths,
                  (res.context[0], "interop"), MaxObjectCount=1)
        virt_conn.CloseEnumeration(res.context)

    @pytest.mark.timeout(30)
    def test_operation_timeout_expiry(self, virt_conn):
        res = virt_conn.OpenEnumerateInstances("CIM_ComputerSystem", MaxObjectCount=1,
                                               OperationTimeout=1)
        assert not res.eos
        time.sleep(2.5)
        cim_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT, virt_conn.PullInstancesWithPath,
                  res.context, MaxObjectCount=1)

    @pytest.mark.timeout(30)
    def test_pull_renews_timeout(self, virt_conn):
        res = virt_conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=1,
                                                   OperationTimeout=3)
        ctx = res.context
        for _ in range(2):
            time.sleep(1.5)
            res = virt_conn.PullInstancePaths(ctx, MaxObjectCount=1)
            assert not res.eos
            ctx = res.context
        virt_conn.CloseEnumeration(ctx)

    def test_invalid_operation_timeout(self, virt_conn):
        cim_error(pywbem.CIM_ERR_INVALID_OPERATION_TIMEOUT, virt_conn.OpenEnumerateInstances,
                  "CIM_ComputerSystem", OperationTimeout=0)

    def test_filter_and_continue_on_error_refused(self, virt_conn):
        cim_error(pywbem.CIM_ERR_FILTERED_ENUMERATION_NOT_SUPPORTED,
                  virt_conn.OpenEnumerateInstances, "CIM_ComputerSystem",
                  FilterQueryLanguage="DMTF:FQL", FilterQuery="Name = 'x'")
        cim_error(pywbem.CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED,
                  virt_conn.OpenEnumerateInstances, "CIM_ComputerSystem", ContinueOnError=True)

    def test_pull_errors_on_open(self, virt_conn):
        cim_error(pywbem.CIM_ERR_INVALID_CLASS, virt_conn.OpenEnumerateInstances, "VIRT_Nope")
        cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE, virt_conn.OpenEnumerateInstancePaths,
                  "CIM_ComputerSystem", namespace="root/nowhere")
        cim_error(pywbem.CIM_ERR_NOT_FOUND, virt_conn.OpenAssociatorInstances,
                  ws.guest_path("missing"))

    def test_interop_pull(self, interop_conn):
        res = interop_conn.OpenEnumerateInstances("CIM_Namespace", MaxObjectCount=1)
        items, pulls = _drain(interop_conn, interop_conn.PullInstancesWithPath, res)
        assert pulls == 1 and {i["Name"] for i in items} == {"root/virt", "interop"}


@pytest.fixture
def small_cap_server():
    """A private server whose pull contexts are capped at 3 per client."""
    from cim_provider.wbem.pull import PullContexts
    srv = ws.InProcessServer(ws.make_test_providers)
    srv.dispatcher.pulls = PullContexts(max_contexts=10, max_per_client=3)
    yield srv
    srv.stop()


def test_cap_on_open_contexts(small_cap_server):
    conn = connect(small_cap_server.url, VIRT)
    ctxs = [conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=1).context
            for _ in range(3)]
    err = cim_error(pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED, conn.OpenEnumerateInstancePaths,
                    "CIM_ComputerSystem", MaxObjectCount=1)
    assert "context" in err.status_description
    # a complete result needs no context, so it is still served
    assert conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=10).eos
    conn.CloseEnumeration(ctxs.pop())
    ctxs.append(conn.OpenEnumerateInstancePaths("CIM_ComputerSystem", MaxObjectCount=1).context)
    for c in ctxs:
        conn.CloseEnumeration(c)


# --- errors ------------------------------------------------------------------------------

class TestErrors:
    def test_unknown_namespace(self, interop_conn):
        for fn, args in [(interop_conn.EnumerateInstances, ("CIM_Namespace",)),
                         (interop_conn.EnumerateInstanceNames, ("CIM_Namespace",)),
                         (interop_conn.GetClass, ("CIM_Namespace",)),
                         (interop_conn.EnumerateClassNames, ()),
                         (interop_conn.EnumerateQualifiers, ()),
                         (interop_conn.OpenEnumerateInstances, ("CIM_Namespace",))]:
            cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE, fn, *args, namespace="root/nowhere")
        cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE, interop_conn.GetInstance,
                  CIMInstanceName("CIM_Namespace", {"Name": "x"}, namespace="nowhere"))

    def test_unknown_class(self, interop_conn):
        for fn in (interop_conn.EnumerateInstances, interop_conn.EnumerateInstanceNames,
                   interop_conn.OpenEnumerateInstancePaths):
            cim_error(pywbem.CIM_ERR_INVALID_CLASS, fn, "VIRT_NoSuchClass")
        cim_error(pywbem.CIM_ERR_INVALID_CLASS, interop_conn.EnumerateClassNames,
                  ClassName="VIRT_NoSuchClass")
        cim_error(pywbem.CIM_ERR_INVALID_CLASS, interop_conn.EnumerateClasses,
                  ClassName="VIRT_NoSuchClass")

    def test_unknown_instance(self, interop_conn):
        p = CIMInstanceName("CIM_ObjectManager", {
            "SystemCreationClassName": "VIRT_HostSystem", "SystemName": "elsewhere",
            "CreationClassName": "CIM_ObjectManager", "Name": "cim-provider"},
            namespace="interop")
        cim_error(pywbem.CIM_ERR_NOT_FOUND, interop_conn.GetInstance, p)

    def test_unsupported_operations(self, interop_conn):
        inst = interop_conn.EnumerateInstances("CIM_Namespace")[0]
        path = inst.path
        new = CIMInstance("CIM_Namespace", properties={"Name": "x"},
                          path=CIMInstanceName("CIM_Namespace", {"Name": "x"},
                                               namespace="interop"))
        for fn, args in [
                (interop_conn.CreateInstance, (new,)),
                (interop_conn.ModifyInstance, (inst,)),
                (interop_conn.DeleteInstance, (path,)),
                (interop_conn.CreateClass, (CIMClass("VIRT_New"),)),
                (interop_conn.DeleteClass, ("CIM_Namespace",)),
                (interop_conn.ModifyClass, (CIMClass("CIM_Namespace"),)),
                (interop_conn.DeleteQualifier, ("Key",)),
                (interop_conn.SetQualifier, (CIMQualifierDeclaration("X", "string"),))]:
            cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, fn, *args)
        # the server still answers afterwards
        assert len(interop_conn.EnumerateInstanceNames("CIM_Namespace")) == 2

    def test_invalid_parameters(self, interop_conn):
        path = interop_conn.EnumerateInstanceNames("CIM_Namespace")[0]
        cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, interop_conn.Associators, path,
                  AssocClass="NoSuchAssoc")
        cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, interop_conn.OpenEnumerateInstances,
                  "CIM_Namespace", MaxObjectCount=10**9)

    def test_class_level_associations_not_supported(self, interop_conn):
        cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, interop_conn.Associators, "CIM_Namespace")
        cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, interop_conn.ReferenceNames, "CIM_Namespace")


# --- a sweep over every class: no request may fail inside the server ----------------------

def _sweep(conn: pywbem.WBEMConnection, namespaces) -> tuple[int, list]:
    """Every class: enumerate (traditional and pull, 1 at a time); every instance: get,
    associators, references. Returns (operations, CIM_ERR_FAILED or unexpected errors)."""
    bad, n = [], 0
    for ns in namespaces:
        for cn in conn.EnumerateClassNames(namespace=ns, DeepInheritance=True):
            insts = conn.EnumerateInstances(cn, namespace=ns)
            paths = conn.EnumerateInstanceNames(cn, namespace=ns)
            assert len(insts) == len(paths), cn
            res = conn.OpenEnumerateInstances(cn, namespace=ns, MaxObjectCount=1)
            pulled = list(res.instances)
            while not res.eos:
                res = conn.PullInstancesWithPath(res.context, MaxObjectCount=1)
                pulled.extend(res.instances)
            assert len(pulled) == len(insts), cn
            n += 3
            for inst in insts:
                for op in ("GetInstance", "Associators", "References", "AssociatorNames",
                           "ReferenceNames"):
                    try:
                        getattr(conn, op)(inst.path)
                    except CIMError as exc:
                        bad.append((ns, cn, op, exc.status_code_name,
                                    exc.status_description))
                    n += 1
    return n, bad


@pytest.mark.timeout(120)
def test_sweep_subprocess_server(subprocess_server):
    n, bad = _sweep(connect(subprocess_server.url), ["interop", "root/virt"])
    assert not bad
    assert n > 100
    assert "internal error in" not in subprocess_server.log_text()     # dispatch's log.exception


@pytest.mark.timeout(120)
def test_sweep_inprocess_server(inproc_server):
    n, bad = _sweep(connect(inproc_server.url), ["root/virt"])
    assert not bad and n > 50
