"""Resource pools (DSP1041): VIRT_ProcessorPool, VIRT_MemoryPool, VIRT_DiskPool,
VIRT_NetworkPool.

The processor and memory pools are primordial, one each for the host: Capacity from
libvirt's node info, Reserved = what the running systems hold (kept as running totals
from the inventory's change feed, so a read never walks the systems). There is one disk
pool per libvirt storage pool (capacity, allocation, available, path) and one network
pool per libvirt network, both from inventory.resources, which libvirt's storage-pool
and network events keep fresh.

InstanceID (key): VIRT:pool:processor, VIRT:pool:memory, VIRT:pool:disk:<pool name>,
VIRT:pool:network:<network name>. Converters: `pool_path`, `pool_of` (a device of a
configuration -> the InstanceID of its pool).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import Disk, DomainRecord, Network, Nic, StoragePool
from ..inventory.resources import HostResources
from ..wbem.provider import Provider
from .backend import VIRT_NS, Backend, make

PROC_POOL, MEM_POOL, DISK_POOL, NET_POOL = ("VIRT_ProcessorPool", "VIRT_MemoryPool",
                                            "VIRT_DiskPool", "VIRT_NetworkPool")
POOL_CLASSES = (PROC_POOL, MEM_POOL, DISK_POOL, NET_POOL)
PREFIX = "VIRT:pool:"
PROC_IID, MEM_IID = PREFIX + "processor", PREFIX + "memory"
RT_PROCESSOR, RT_MEMORY, RT_ETHERNET, RT_DISK = 3, 4, 10, 17
_CLASS_OF = {"processor": PROC_POOL, "memory": MEM_POOL, "disk": DISK_POOL,
             "network": NET_POOL}


def disk_pool_iid(name: str) -> str:
    return f"{PREFIX}disk:{name}"


def net_pool_iid(name: str) -> str:
    return f"{PREFIX}network:{name}"


def pool_class(iid: object) -> str | None:
    """The class of the pool an InstanceID names (None: not a pool InstanceID)."""
    if not isinstance(iid, str) or not iid.startswith(PREFIX):
        return None
    return _CLASS_OF.get(iid[len(PREFIX):].split(":", 1)[0])


def pool_path(iid: str) -> CIMInstanceName:
    return CIMInstanceName(pool_class(iid) or PROC_POOL, {"InstanceID": iid},
                           namespace=VIRT_NS)


def pool_of(res: HostResources, kind: str, device: object) -> str | None:
    """The InstanceID of the pool a resource of a configuration comes from: "proc" and
    "mem" from the host's; a disk from the storage pool of its volume or the one whose
    directory holds its file; a NIC on a libvirt network from that network's. None
    when it comes from no pool we show (a bridge, a file outside every pool)."""
    if kind == "proc":
        return PROC_IID
    if kind == "mem":
        return MEM_IID
    if isinstance(device, Disk):
        if device.pool and device.pool in res.pools:
            return disk_pool_iid(device.pool)
        pool = res.pool_of_path(device.source) if device.source_type != "volume" else None
        return disk_pool_iid(pool.name) if pool is not None else None
    if isinstance(device, Nic) and device.type == "network" and device.source in res.networks:
        return net_pool_iid(device.source or "")
    return None


def _left(capacity: int | None, reserved: int) -> int | None:
    return None if capacity is None else max(0, capacity - reserved)


class PoolsProvider(Provider):
    """Every pool class. The running totals follow the inventory's change feed."""
    namespace = VIRT_NS
    classnames = POOL_CLASSES

    def __init__(self, backend: Backend):
        self.b = backend
        self.res: HostResources = backend.inventory.resources
        self.vcpus = 0
        self.memory_kib = 0
        self.nics: Counter[str] = Counter()
        for rec in backend.inventory.records():
            self._add(rec, 1)
        backend.inventory.subscribe(self._on_change)
        self._built: tuple[Any, dict[str, tuple[CIMInstance, ...]]] | None = None

    def _add(self, rec: DomainRecord | None, sign: int) -> None:
        """Count in (sign 1) or out (-1) the vCPUs, memory and NICs per network that a
        record holds while it runs (no Counter of its own: 10,000 at start-up)."""
        if rec is None or rec.running is None:
            return
        cfg = rec.running.config
        self.vcpus += sign * (cfg.vcpus or 0)
        self.memory_kib += sign * (cfg.memory_kib or 0)
        for nic in cfg.nics:
            if nic.type == "network" and nic.source:
                self.nics[nic.source] += sign

    def _on_change(self, change) -> None:
        self._add(change.old, -1)
        self._add(change.new, 1)

    # ---- converters ----------------------------------------------------------------------

    def _primordial(self) -> list[tuple[str, dict[str, Any]]]:
        cap = self.res.capacity
        cpus, mem = (cap.cpus, cap.memory_kib) if cap is not None else (None, None)
        return [
            (PROC_POOL, {"InstanceID": PROC_IID, "PoolID": "processor", "Primordial": True,
                         "ElementName": "Host processors", "ResourceType": RT_PROCESSOR,
                         "AllocationUnits": "count", "ConsumedResourceUnits": "count",
                         "Capacity": cpus, "Reserved": self.vcpus,
                         "CurrentlyConsumedResource": self.vcpus, "MaxConsumableResource": cpus,
                         "Available": _left(cpus, self.vcpus)}),
            (MEM_POOL, {"InstanceID": MEM_IID, "PoolID": "memory", "Primordial": True,
                        "ElementName": "Host memory", "ResourceType": RT_MEMORY,
                        "AllocationUnits": "byte*2^10", "ConsumedResourceUnits": "byte*2^10",
                        "Capacity": mem, "Reserved": self.memory_kib,
                        "CurrentlyConsumedResource": self.memory_kib,
                        "MaxConsumableResource": mem,
                        "Available": _left(mem, self.memory_kib)})]

    @staticmethod
    def _disk(p: StoragePool) -> dict[str, Any]:
        return {"InstanceID": disk_pool_iid(p.name), "PoolID": p.name, "Primordial": False,
                "ElementName": p.name, "Caption": f"Storage pool {p.name}",
                "ResourceType": RT_DISK, "ResourceSubType": p.type,
                "AllocationUnits": "byte", "ConsumedResourceUnits": "byte",
                "Capacity": p.capacity, "Reserved": p.allocation,
                "CurrentlyConsumedResource": p.allocation,
                "MaxConsumableResource": p.capacity, "Available": p.available,
                "Path": p.path, "OperationalStatus": [2] if p.active else [10]}

    def _network(self, n: Network) -> dict[str, Any]:
        used = self.nics.get(n.name, 0)
        return {"InstanceID": net_pool_iid(n.name), "PoolID": n.name, "Primordial": False,
                "ElementName": n.name, "Caption": f"Network {n.name}",
                "ResourceType": RT_ETHERNET, "ResourceSubType": n.forward,
                "AllocationUnits": "count", "ConsumedResourceUnits": "count",
                "Reserved": used, "CurrentlyConsumedResource": used,
                "Bridge": n.bridge, "ForwardMode": n.forward,
                "OperationalStatus": [2] if n.active else [10]}

    def instances(self) -> dict[str, tuple[CIMInstance, ...]]:
        """Every pool by class; rebuilt only when the resources or the totals change
        (the same tuples until then, so the dispatcher reuses their rendering)."""
        stamp = (self.res.version, self.vcpus, self.memory_kib, tuple(sorted(self.nics.items())))
        if self._built is not None and self._built[0] == stamp:
            return self._built[1]
        out: dict[str, list[CIMInstance]] = {c: [] for c in POOL_CLASSES}
        rows = self._primordial()
        rows += [(DISK_POOL, self._disk(p)) for p in self.res.pools.values()]
        rows += [(NET_POOL, self._network(n)) for n in self.res.networks.values()]
        for cls, props in rows:
            props.setdefault("OperationalStatus", [2])       # 10: Stopped (inactive)
            props["HealthState"] = 5
            out[cls].append(make(self.b, cls, props, pool_path(props["InstanceID"])))
        self._built = (stamp, {cls: tuple(insts) for cls, insts in out.items()})
        return self._built[1]

    def all(self) -> list[CIMInstance]:
        return [i for insts in self.instances().values() for i in insts]

    def find(self, iid: object) -> CIMInstance | None:
        cls = pool_class(iid)
        if cls is None:
            return None
        return next((i for i in self.instances()[cls] if i["InstanceID"] == iid), None)

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = next(c for c in POOL_CLASSES if c.lower() == classname.lower())
        return self.instances()[cls]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        inst = self.find(path.keybindings.get("InstanceID"))
        if inst is None or inst.classname.lower() != path.classname.lower():
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                           f"no pool {path.keybindings.get('InstanceID')!r}")
        return inst
