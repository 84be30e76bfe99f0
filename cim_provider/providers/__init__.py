"""One module per CIM class (or a family that shares its converters)."""
from __future__ import annotations

from ..wbem.provider import Provider
from .associations import AssociationsProvider
from .backend import INTEROP_NS, VIRT_NS, Backend
from .computer_system import CapabilitiesProvider, ComputerSystemProvider
from .host_system import HostSystemProvider
from .management_service import ManagementServiceProvider
from .profiles import (ConformsToProfileProvider, ReferencedProfileProvider,
                       RegisteredProfileProvider)
from .settings import SettingsProvider


def virt_providers(backend: Backend) -> list[Provider]:
    """Every provider of the virtual-system model (root/virt and its interop side)."""
    settings = SettingsProvider(backend)
    return [ComputerSystemProvider(backend), CapabilitiesProvider(backend), settings,
            HostSystemProvider(backend), ManagementServiceProvider(backend),
            AssociationsProvider(backend, settings),
            RegisteredProfileProvider(backend), ReferencedProfileProvider(backend),
            ConformsToProfileProvider(backend, VIRT_NS),
            ConformsToProfileProvider(backend, INTEROP_NS)]
