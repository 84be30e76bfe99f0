"""The health of the host and the management service, from the health of the sources.

A client that sees zero virtual systems must be able to tell "none defined" from "the
source that would show them is away". VIRT_HostSystem and
VIRT_VirtualSystemManagementService carry the sources' condition (docs/architecture.md,
"Health"):

| sources | OperationalStatus | HealthState | PrimaryStatus |
|---|---|---|---|
| all ok | [2 OK] | 5 OK | 1 OK |
| one degraded (Manager away, not listed yet, list stale) | [3 Degraded] | 10 Degraded/Warning | 2 Degraded |
| one down (libvirt unreachable: no running domain can be seen) | [6 Error] | 20 Major failure | 3 Error |

StatusDescriptions gives one sentence per source that is not ok.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..domain.sources import SourceStatus
from .backend import Backend

# CIM_ManagedSystemElement values
OS_OK, OS_DEGRADED, OS_ERROR = 2, 3, 6
HS_OK, HS_DEGRADED, HS_MAJOR = 5, 10, 20
PS_OK, PS_DEGRADED, PS_ERROR = 1, 2, 3


@dataclass(frozen=True)
class Health:
    operational_status: tuple[int, ...] = (OS_OK,)
    health_state: int = HS_OK
    primary_status: int = PS_OK
    descriptions: tuple[str, ...] = ()

    def properties(self) -> dict[str, object]:
        """The CIM properties that show it."""
        return {"OperationalStatus": list(self.operational_status),
                "HealthState": self.health_state, "PrimaryStatus": self.primary_status,
                "StatusDescriptions": list(self.descriptions) or None}


def statuses(b: Backend) -> list[SourceStatus]:
    return [src.status for src in (b.libvirt, b.manager) if src is not None]


def health_of(b: Backend) -> Health:
    """The combined health of every source the backend has."""
    bad = [s for s in statuses(b) if s.state != "ok"]
    if not bad:
        return Health()
    descriptions = tuple(s.reason for s in bad)
    if any(s.state == "down" for s in bad):
        return Health((OS_ERROR,), HS_MAJOR, PS_ERROR, descriptions)
    return Health((OS_DEGRADED,), HS_DEGRADED, PS_DEGRADED, descriptions)
