"""One module per CIM class (or a family that shares its converters)."""
from __future__ import annotations

from pywbem import CIMInstanceName

from ..wbem.provider import Provider
from .allocation import AllocationAssociationsProvider, AllocationCapabilitiesProvider, Capabilities
from .associations import AssociationsProvider
from .backend import INTEROP_NS, VIRT_NS, Backend
from .computer_system import CapabilitiesProvider, ComputerSystemProvider
from .devices import DevicesProvider, SystemDeviceProvider
from .host_system import HostSystemProvider
from .jobs import JobAssociationsProvider, Jobs, JobsProvider
from .indication_service import (IndicationServiceProvider, ServiceAssociationsProvider,
                                 ServiceLinks, service_path)
from .management_service import ManagementServiceProvider
from .metrics import MetricAssociationsProvider, MetricsProvider
from .pools import DISK_POOL, MEM_POOL, NET_POOL, PROC_POOL, PoolsProvider
from .profiles import (ConformsToProfileProvider, ReferencedProfileProvider,
                       RegisteredProfileProvider)
from .settings import SettingsProvider


def virt_providers(backend: Backend, jobs: Jobs | None = None) -> list[Provider]:
    """Every provider of the virtual-system model (root/virt and its interop side).
    `jobs`: where long methods become jobs (default: a Jobs with its defaults)."""
    jobs = jobs if jobs is not None else Jobs()
    systems = ComputerSystemProvider(backend)
    systems.jobs = jobs
    settings = SettingsProvider(backend)
    devices = DevicesProvider(backend)
    pools = PoolsProvider(backend)
    caps = Capabilities(backend, pools)
    settings.capabilities = caps.settings
    vsms = ManagementServiceProvider(backend)
    vsms.jobs = jobs
    settings.templates = vsms.templates.settings           # the Manager's templates
    allocation = AllocationAssociationsProvider(backend, pools, caps, devices)
    metrics = MetricsProvider(backend)
    links = ServiceLinks(backend)

    def centrals() -> dict[str, list[CIMInstanceName]]:
        """The central instances of the profiles whose instances come and go."""
        by_class = {cls: [i.path for i in insts] for cls, insts in pools.instances().items()}
        return {"DSP1041": [p for paths in by_class.values() for p in paths],
                "DSP1044": by_class[PROC_POOL], "DSP1045": by_class[MEM_POOL],
                "DSP1047": by_class[DISK_POOL], "DSP1050": by_class[NET_POOL],
                "DSP1053": [d.path for d in metrics.definitions()],
                "DSP1054": [service_path(backend.host)]}

    return [systems, CapabilitiesProvider(backend), settings,
            HostSystemProvider(backend), vsms,
            AssociationsProvider(backend, settings, [allocation, links, vsms.templates], systems),
            devices, SystemDeviceProvider(backend, devices), pools,
            AllocationCapabilitiesProvider(caps), allocation,
            metrics, MetricAssociationsProvider(backend, metrics),
            IndicationServiceProvider(backend), ServiceAssociationsProvider(links),
            RegisteredProfileProvider(backend, centrals),
            ReferencedProfileProvider(backend, centrals),
            ConformsToProfileProvider(backend, VIRT_NS, centrals),
            ConformsToProfileProvider(backend, INTEROP_NS, centrals),
            JobsProvider(backend, jobs), JobAssociationsProvider(backend, jobs)]
