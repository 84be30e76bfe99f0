"""Pull enumeration contexts (DSP0200 5.4): results handed out page by page.

An enumeration context is a `Cursor`: a snapshot of each provider's keys (taken when
the Open runs) and a position; each Open or Pull makes and renders only the instances
of its own page (pullops.py), so 100,000 systems are never built at once. Smaller
results (associators, references, queries) are rendered whole by the Open and kept
as items, each Pull handing out the next MaxObjectCount of them. A context expires
OperationTimeout seconds after the last operation on it; the number of open contexts
is capped overall and per client, and what item contexts hold in bytes.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pywbem
from pywbem import CIMError

DEFAULT_TIMEOUT = 60.0       # seconds, when the client sends no OperationTimeout
MAX_TIMEOUT = 3600.0
MAX_CONTEXTS = 1000
MAX_CONTEXTS_PER_CLIENT = 64
MAX_OBJECT_COUNT = 100_000   # per Open/Pull response
MAX_BYTES = 256 * 1024 * 1024   # rendered results held by all open contexts together


class Cursor:
    """Where a streaming enumeration is: per provider (leaf class) the snapshot of its
    keys, and the next key to hand out. `provider` None: the keys are the objects."""

    __slots__ = ("segments", "seg", "pos", "total", "taken", "maker")

    def __init__(self, segments: Sequence[tuple[str, Any, Sequence]], maker: Any = None):
        self.maker = maker               # how pages are made (pullops.py's)
        self.segments = [s for s in segments if len(s[2])]
        self.seg = 0
        self.pos = 0
        self.total = sum(len(s[2]) for s in self.segments)
        self.taken = 0                   # keys handed out so far

    @property
    def done(self) -> bool:
        return self.taken >= self.total

    def next(self, count: int) -> tuple[str, Any, Sequence, int, int] | None:
        """(leaf, provider, keys, start, stop): the next at most `count` keys, all of
        one provider; None when there are none left."""
        if count <= 0 or self.done:
            return None
        leaf, prov, keys = self.segments[self.seg]
        start = self.pos
        stop = min(len(keys), start + count)
        self.taken += stop - start
        if stop >= len(keys):
            self.seg, self.pos = self.seg + 1, 0
        else:
            self.pos = stop
        return leaf, prov, keys, start, stop


@dataclass
class _Context:
    namespace: str
    kind: str                    # "instances" | "paths" | "query"
    items: Sequence              # rendered pieces, or tuples of pieces, one per object
    timeout: float
    client: str
    pos: int = 0
    expires: float = field(default=0.0)
    size: int = 0                # characters of CIM-XML held for later pulls
    offsets: Sequence[int] | None = None     # where each item starts (bytes), if known
    cursor: Cursor | None = None  # a streaming context: pages made when pulled
    busy: bool = False           # a page is being made (another Pull must wait its turn)


class PullContexts:
    def __init__(self, max_contexts: int = MAX_CONTEXTS,
                 max_per_client: int = MAX_CONTEXTS_PER_CLIENT,
                 default_timeout: float = DEFAULT_TIMEOUT, max_timeout: float = MAX_TIMEOUT,
                 max_bytes: int = MAX_BYTES):
        self._ctx: dict[str, _Context] = {}
        self.max_bytes = max_bytes
        self.max_contexts = max_contexts
        self.max_per_client = max_per_client
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout

    def __len__(self) -> int:
        self._expire()
        return len(self._ctx)

    def check_timeout(self, timeout: int | None) -> float:
        """OperationTimeout -> seconds. 0 would mean 'never expire': refused (DSP0200
        lets a server reject it with CIM_ERR_INVALID_OPERATION_TIMEOUT)."""
        if timeout is None:
            return self.default_timeout
        if timeout == 0 or timeout > self.max_timeout:
            raise CIMError(pywbem.CIM_ERR_INVALID_OPERATION_TIMEOUT,
                           f"OperationTimeout must be 1..{int(self.max_timeout)} seconds")
        return float(timeout)

    def _expire(self) -> None:
        now = time.monotonic()
        for cid in [c for c, v in self._ctx.items() if v.expires <= now and not v.busy]:
            del self._ctx[cid]

    @staticmethod
    def check_count(n: int) -> None:
        if n > MAX_OBJECT_COUNT:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"MaxObjectCount above the server's limit of {MAX_OBJECT_COUNT}")

    def open(self, namespace: str, kind: str, items: Sequence, max_count: int,
             timeout: float, client: str, offsets: Sequence[int] | None = None
             ) -> tuple[str | None, Sequence, bool]:
        """Returns (context id or None, first slice, end of sequence). An item is the
        rendered text or bytes of one object, or a tuple of such pieces; `offsets`
        (where each item starts, and the total) spares counting their sizes. `items`
        is never changed: it may be shared (render.py keeps enumerations)."""
        self.check_count(max_count)
        if len(items) <= max_count:
            return None, items, True
        self._reserve(client)
        # Each context holds its whole rendered result until pulled: a count alone would
        # let 64 contexts of a 10,000-system enumeration hold over a gigabyte.
        size = (offsets[-1] - offsets[max_count]) if offsets is not None \
            else _size(items, max_count)
        if size + sum(c.size for c in self._ctx.values()) > self.max_bytes:
            raise CIMError(pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED,
                           "open enumeration contexts hold too much data; pull or close "
                           "some first")
        cid = secrets.token_urlsafe(18)
        ctx = _Context(namespace.lower(), kind, items, timeout, client, pos=max_count,
                       expires=time.monotonic() + timeout, size=size, offsets=offsets)
        self._ctx[cid] = ctx
        return cid, items[:max_count], False

    def _reserve(self, client: str) -> None:
        """Refuse a new context over the caps (overall, per client)."""
        self._expire()
        if len(self._ctx) >= self.max_contexts or \
                sum(1 for c in self._ctx.values() if c.client == client) >= self.max_per_client:
            raise CIMError(pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED,
                           "too many open enumeration contexts; close some first")

    def open_stream(self, namespace: str, kind: str, cursor: Cursor, max_count: int,
                    timeout: float, client: str) -> str:
        """A streaming context for `cursor`, busy until `release`: the caller makes the
        first page. It holds no rendered data (the byte budget is for item contexts)."""
        self.check_count(max_count)
        self._reserve(client)
        cid = secrets.token_urlsafe(18)
        self._ctx[cid] = _Context(namespace.lower(), kind, (), timeout, client,
                                  expires=time.monotonic() + timeout, cursor=cursor,
                                  busy=True)
        return cid

    def stream(self, namespace: str, kind: str, cid: str, max_count: int,
               client: str) -> Cursor | None:
        """The cursor of a streaming context, busy until `release`; None: an item
        context (`pull_with_offsets`). A Pull while another is making a page of the
        same context is refused (DSP0200 leaves it to the server)."""
        self.check_count(max_count)
        ctx = self._get(namespace, kind, cid, client)
        if ctx.cursor is None:
            return None
        if ctx.busy:
            raise CIMError(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT,
                           "another operation is pulling from this enumeration context")
        ctx.busy = True
        return ctx.cursor

    def release(self, cid: str, eos: bool) -> str | None:
        """A page of the streaming context `cid` is made: the context is gone at the
        end of the sequence, else free again with its expiry moved on. Returns the
        context id to hand out (None: none)."""
        ctx = self._ctx.get(cid)
        if ctx is None:                  # closed or expired while the page was made
            return None
        ctx.busy = False
        if eos:
            del self._ctx[cid]
            return None
        ctx.expires = time.monotonic() + ctx.timeout
        return cid

    def _get(self, namespace: str, kind: str | None, cid: str, client: str) -> _Context:
        self._expire()
        ctx = self._ctx.get(cid)
        if ctx is None or ctx.namespace != namespace.lower() or ctx.client != client \
                or (kind is not None and ctx.kind != kind):
            raise CIMError(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT,
                           "enumeration context unknown, closed, expired or of another kind")
        return ctx

    def pull(self, namespace: str, kind: str, cid: str, max_count: int,
             client: str) -> tuple[Sequence, bool, str | None]:
        chunk, _offsets, eos, cid_out = self.pull_with_offsets(namespace, kind, cid,
                                                               max_count, client)
        return chunk, eos, cid_out

    def pull_with_offsets(self, namespace: str, kind: str, cid: str, max_count: int,
                          client: str
                          ) -> tuple[Sequence, Sequence[int] | None, bool, str | None]:
        """As `pull`, with the offsets of the items handed out (None: not known)."""
        self.check_count(max_count)
        ctx = self._get(namespace, kind, cid, client)
        start = ctx.pos
        chunk = ctx.items[start:start + max_count]
        ctx.pos += len(chunk)
        offsets = None if ctx.offsets is None else ctx.offsets[start:ctx.pos + 1]
        if ctx.pos >= len(ctx.items):
            del self._ctx[cid]
            return chunk, offsets, True, None
        ctx.expires = time.monotonic() + ctx.timeout
        return chunk, offsets, False, cid

    def close(self, namespace: str, cid: str, client: str) -> None:
        self._get(namespace, None, cid, client)
        del self._ctx[cid]


def _size(items: Sequence, start: int) -> int:
    """Characters (or bytes) of the items from `start` on."""
    total = 0
    for i in range(start, len(items)):
        item = items[i]
        total += sum(map(len, item)) if type(item) is tuple else len(item)
    return total
