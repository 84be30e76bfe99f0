"""The merge of running and passive domains into one record per UUID, the cache of
those records and its change feed. The records themselves live in `domain/`."""
from .inventory import Change, Inventory, merge

__all__ = ["Change", "Inventory", "merge"]
