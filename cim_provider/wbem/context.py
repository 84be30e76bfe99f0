"""Who asks, and what an operation produced: the values passed between the HTTP
front, the dispatcher and the providers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OperationContext:
    """Who is asking: filled in by the HTTP front after authentication."""
    client: str = "local"
    user: str | None = None
    role: str = "operator"           # reader | operator


@dataclass
class Result:
    """What an operation produced: IRETURNVALUE content (None = no IRETURNVALUE)
    and extra output PARAMVALUEs (pull operations)."""
    body: list[str] | None
    params: list[str] | None = None
