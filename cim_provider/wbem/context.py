"""Who asks, and what an operation produced: the values passed between the HTTP
front, the dispatcher and the providers."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    # Run outside a task (the HTTP fast lane steps the coroutine once): an unexpected
    # exception is raised, not answered, so that the request is run again the usual way.
    direct: bool = False
    # The shape of a GetInstance the fast lane could not answer from a kept plan
    # (request.py, QuickGet): the dispatcher keeps a plan for it once it succeeds.
    quick: tuple | None = None


# A response may be cut into chunks of about this many bytes (the HTTP front writes
# a large one chunk by chunk); Pieces know where, so nobody looks at every piece again.
CHUNK = 256 * 1024


class Pieces:
    """A response body in UTF-8 pieces, with their total size and the indexes where
    it may be cut into chunks of about CHUNK bytes (`pieces[cuts[i-1]:cuts[i]]`).
    Never changed once complete: render.py keeps and shares them."""

    __slots__ = ("pieces", "size", "cuts", "since")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.cuts: list[int] = []
        self.since = 0                   # bytes after the last cut

    def add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        n = len(piece)
        self.size += n
        self.since += n
        if self.since >= CHUNK:
            self.cuts.append(len(self.pieces))
            self.since = 0

    def add_all(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.add(piece)

    def add_item(self, item: Sequence[bytes]) -> None:
        """The few pieces of one item (an instance's): counted together, and a cut
        when due comes after the item, not inside it. A call per piece was a sixth of
        the first enumeration of 10,000 systems (issue 16, start-up)."""
        self.pieces += item
        n = sum(map(len, item))
        self.size += n
        self.since += n
        if self.since >= CHUNK:
            self.cuts.append(len(self.pieces))
            self.since = 0

    def extend(self, other: Pieces) -> None:
        """`other`'s pieces after these (its cuts kept, shifted)."""
        base = len(self.pieces)
        self.pieces += other.pieces
        self.size += other.size
        if other.cuts:
            self.cuts += [base + c for c in other.cuts]
            self.since = other.since
        else:
            self.since += other.size
            if self.since >= CHUNK:
                self.cuts.append(len(self.pieces))
                self.since = 0

    def chunks(self) -> list[list[bytes]]:
        """The pieces cut where `cuts` says."""
        out, start = [], 0
        for cut in self.cuts:
            out.append(self.pieces[start:cut])
            start = cut
        if start < len(self.pieces):
            out.append(self.pieces[start:])
        return out


@dataclass
class Result:
    """What an operation produced: IRETURNVALUE content (None = no IRETURNVALUE)
    and extra output PARAMVALUEs (pull operations). The body is text pieces or, for
    what render.py renders, UTF-8 Pieces."""
    body: list[str] | Pieces | None
    params: list[str] | None = None
