"""CIM-free domain records, the merge rules, the cache and its change feed."""
from .inventory import Change, Inventory, merge
from .records import Disk, DomainConfig, DomainRecord, Kind, Nic, RunningDomain, RunState

__all__ = ["Change", "Disk", "DomainConfig", "DomainRecord", "Inventory", "Kind", "Nic",
           "RunState", "RunningDomain", "merge"]
