"""Who asks, and what an operation produced: the values passed between the HTTP
front, the dispatcher and the providers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class OperationContext:
    """Who is asking: filled in by the HTTP front after authentication."""
    client: str = "local"
    user: str | None = None
    role: str = "operator"           # reader | operator
    # What a modifying operation produced, for the audit record (audit.py): a
    # method's return value, the path of a created instance.
    outcome: Any = None


@dataclass
class Result:
    """What an operation produced: IRETURNVALUE content (None = no IRETURNVALUE)
    and extra output PARAMVALUEs (pull operations)."""
    body: list[str] | None
    params: list[str] | None = None
