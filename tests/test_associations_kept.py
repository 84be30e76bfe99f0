"""What the associations provider keeps (issue 16, RSS per domain): HostedDependency,
one instance per system when walked from the host, is built for each walk and never
kept; the others stay cached per record version. The walk's answer is the same either
way."""
from __future__ import annotations

import asyncio
import uuid as uuidlib

from pywbem import CIMInstanceName

from cim_provider.domain.records import DomainConfig
from cim_provider.inventory.inventory import Inventory
from cim_provider.providers import Backend, virt_providers
from cim_provider.providers.associations import HD, SDS, AssociationsProvider
from cim_provider.providers.computer_system import system_path
from cim_provider.wbem.provider import path_key

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
