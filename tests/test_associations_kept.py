"""What the associations provider keeps (issue 16, RSS per domain): HostedDependency,
one instance per system when walked from the host, is built for each walk and never
kept; the others stay cached per record version. The walk's answer is the same either
way. Associators from the host name the systems themselves (`associated`), without an
association instance per guest."""
from __future__ import annotations

import asyncio
import re
import uuid as uuidlib

import pytest

from pywbem import CIMInstanceName

from cim_provider.domain.records import DomainConfig
from cim_provider.inventory.inventory import Inventory
from cim_provider.providers import Backend, virt_providers
from cim_provider.providers.associations import HD, SDS, AssociationsProvider
from cim_provider.providers.computer_system import system_path
from cim_provider.wbem.provider import object_key, path_key

try:
    from tests.test_pull_streaming import Model
except ImportError:  # tests/ itself on sys.path
    from test_pull_streaming import Model  # type: ignore

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

N = 200


def _setup() -> tuple[Inventory, Backend, AssociationsProvider]:
    inv = Inventory()
    uuids = [str(uuidlib.UUID(int=0xA55 << 100 | i)) for i in range(N)]
    inv.set_defined({u: DomainConfig(uuid=u, name=f"g-{i:04d}", type="kvm")
                     for i, u in enumerate(uuids)})
    backend = Backend(ws.test_repository(), inv, ws.TEST_HOST)
    assoc = next(p for p in virt_providers(backend) if isinstance(p, AssociationsProvider))
    return inv, backend, assoc


def _dependents(insts) -> list[tuple]:
    return sorted(path_key(i["Dependent"]) for i in insts)


def test_hosted_dependency_from_the_host_is_not_kept():
    inv, backend, assoc = _setup()
    host = backend.host_path()
    first = asyncio.run(assoc.references(HD, host))
    second = asyncio.run(assoc.references(HD, host))
    want = sorted(path_key(system_path(r.uuid)) for r in inv.records())
    assert _dependents(first) == _dependents(second) == want and len(want) == N
    assert all(path_key(i["Antecedent"]) == path_key(host) for i in first)
    assert not any(assoc._cache._data.values()), "HostedDependency instances were kept"


def test_other_associations_stay_cached_per_record_version():
    inv, _backend, assoc = _setup()
    rec = next(iter(inv.records()))
    source = system_path(rec.uuid)
    one = asyncio.run(assoc.references(SDS, source))
    again = asyncio.run(assoc.references(SDS, source))
    assert len(one) == 1 and one[0] is again[0]            # built once, then kept
    hd = asyncio.run(assoc.references(HD, source))
    assert [path_key(i["Dependent"]) for i in hd] == [path_key(source)]
    assert isinstance(hd[0]["Antecedent"], CIMInstanceName)


def test_the_host_names_its_guests_without_association_instances():
    inv, backend, assoc = _setup()
    host = backend.host_path()
    found = assoc.associated(HD, host)
    assert found is not None and len(found) == N
    want = sorted(path_key(system_path(r.uuid)) for r in inv.records())
    assert sorted(object_key(t) for _via, _role, t in found) == want
    for via, role, target in found:
        assert (via, role) == ("Antecedent", "Dependent")
        # the very object GetInstance of that system returns, rendered once for both
        assert target is asyncio.run(assoc.systems.get_instance(target.path))


def test_other_walks_go_through_references():
    inv, backend, assoc = _setup()
    rec = next(iter(inv.records()))
    other_host = CIMInstanceName(backend.host_path().classname,
                                 {**backend.host_path().keybindings, "Name": "elsewhere"},
                                 namespace=backend.host_path().namespace)
    for cls, source in [(HD, system_path(rec.uuid)), (SDS, backend.host_path()),
                        (HD, other_host)]:
        assert assoc.associated(cls, source) is None, (cls, source)


# (desc, object, expected path_key): object_key gives path_key without making the path
OBJECT_KEYS = [
    ("a path", system_path("U-1"), path_key(system_path("U-1"))),
    ("a path without namespace, request's namespace",
     CIMInstanceName("VIRT_ComputerSystem", {"Name": "U-1", "CreationClassName": "VIRT_ComputerSystem"}),
     path_key(system_path("U-1"))),
]


def test_object_key():
    for desc, obj, expected in OBJECT_KEYS:
        assert object_key(obj, "root/virt") == expected, desc
    inv, _backend, assoc = _setup()
    for rec in inv.records():
        inst = assoc.systems.instance(rec)
        assert object_key(inst) == path_key(inst.path) == path_key(system_path(rec.uuid))


# Through the dispatcher (real providers, no HTTP): (desc, filters, every guest or none)
HOST_WALKS = [
    ("HostedDependency", {"AssocClass": "VIRT_HostedDependency"}, True),
    ("its superclass", {"AssocClass": "CIM_HostedDependency", "ResultClass": "CIM_System"}, True),
    ("Role Antecedent", {"AssocClass": "VIRT_HostedDependency", "Role": "antecedent"}, True),
    ("Role Dependent", {"AssocClass": "VIRT_HostedDependency", "Role": "Dependent"}, False),
    ("ResultRole Dependent", {"AssocClass": "VIRT_HostedDependency",
                              "ResultRole": "DEPENDENT"}, True),
    ("ResultRole Antecedent", {"AssocClass": "VIRT_HostedDependency",
                               "ResultRole": "Antecedent"}, False),
    ("ResultClass VIRT_ComputerSystem", {"ResultClass": "VIRT_ComputerSystem"}, True),
    ("ResultClass of the service", {"AssocClass": "VIRT_HostedDependency",
                                    "ResultClass": "CIM_Service"}, False),
]


def _host_walk(model, method: str, filters: dict) -> list[str]:
    host = ws.host_path()
    kbs = "".join(f'<KEYBINDING NAME="{k}"><KEYVALUE VALUETYPE="string">{v}</KEYVALUE>'
                  f"</KEYBINDING>" for k, v in host.keybindings.items())
    params = (f'<IPARAMVALUE NAME="ObjectName"><INSTANCENAME CLASSNAME="{host.classname}">'
              f"{kbs}</INSTANCENAME></IPARAMVALUE>")
    for name, value in filters.items():
        if name.endswith("Class"):
            params += f'<IPARAMVALUE NAME="{name}"><CLASSNAME NAME="{value}"/></IPARAMVALUE>'
        else:
            params += f'<IPARAMVALUE NAME="{name}"><VALUE>{value}</VALUE></IPARAMVALUE>'
    text = model.call(method, params)
    assert "<ERROR" not in text, text[:500]
    return sorted(re.findall(r'<KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string" '
                             r'TYPE="string">([^<]+)</KEYVALUE>', text))


@pytest.mark.parametrize("desc,filters,every", HOST_WALKS, ids=[w[0] for w in HOST_WALKS])
def test_associators_from_the_host(desc, filters, every):
    model = Model(N // 10)
    try:
        want = sorted(r.uuid for r in model.inventory.records()) if every else []
        assert _host_walk(model, "AssociatorNames", filters) == want
        assert _host_walk(model, "Associators", filters) == want
    finally:
        model.loop.close()


def test_associators_from_the_host_do_not_walk_references(monkeypatch):
    """The dispatcher takes the provider's `associated` for HostedDependency from the
    host: its `references` are not asked (they would make an instance per guest)."""
    def refuse(self, classname, source):
        if classname.lower() == HD.lower() and source.classname == backend_host_class():
            raise AssertionError("references walked from the host")
        return original(self, classname, source)
    original = AssociationsProvider.references
    monkeypatch.setattr(AssociationsProvider, "references", refuse)
    model = Model(N // 10)
    try:
        want = sorted(r.uuid for r in model.inventory.records())
        assert _host_walk(model, "Associators", {"AssocClass": HD}) == want
        assert _host_walk(model, "AssociatorNames", {"ResultRole": "Dependent",
                                                     "AssocClass": HD}) == want
    finally:
        model.loop.close()


def backend_host_class() -> str:
    return ws.host_path().classname
