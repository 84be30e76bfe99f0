"""The pull operations (DSP0200 5.4), for the dispatcher's table: Open*, Pull*, and the
pages they hand out.

OpenEnumerateInstances and OpenEnumerateInstancePaths stream: the Open takes a
snapshot of each provider's keys (provider.py, `enumerate_keys`) into a `Cursor`
(pull.py) and makes only its own page; each Pull asks the providers for the instances
of the next keys (`instances_of`: what went away since is left out) and renders just
those. A page of unchanged instances is kept rendered (`Pages`: references to the
instances' own cached bytes), so a client that walks an unchanged enumeration again
is answered without rendering or joining anything (docs/architecture.md, "Data flow":
rendered once, sent many times). Associators and References, whose results are
small, are rendered whole by their Open and handed out in slices.
"""
from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import TYPE_CHECKING, Any, Callable

import pywbem
from pywbem import CIMError

from . import writer as w
from .context import OperationContext, Pieces, Result
from .instance import Instance
from .provider import Provider
from .pull import Cursor
from .render import IWP, Named, encode, instance_path, pieces_of, with_path
from .repository import Namespace

if TYPE_CHECKING:
    from .dispatch import Dispatcher

PAGE_PIECES = 2_000_000          # pieces of the pages kept, all enumerations together
PAGE_OWN_BYTES = 32 * 1024 * 1024   # bytes the kept pages joined themselves (see below)
PAGE_MAX = 1024                  # pages kept


class Pages:
    """Rendered pages by (kind, namespace, host, view, leaf, start, stop), kept while
    the provider hands out the very same Instance objects for them (instances are
    immutable once returned: provider.py), the oldest dropped beyond PAGE_PIECES or
    PAGE_OWN_BYTES. A page is its instances' own cached INSTANCENAME and INSTANCE bytes
    and the shared tags between them joined (`_page_pieces`), which the HTTP front
    hands to the transport as they are (http.py, WRITELINES_MAX). Kept joined whole
    instead, a 2 MB page was written faster still, but that is a
    second copy of every page (~2 KiB per system instead of ~40 bytes of pointers)."""

    def __init__(self) -> None:
        self._pages: dict[tuple, tuple[tuple, Pieces, int]] = {}
        self._pieces = 0
        self._own = 0

    def __len__(self) -> int:
        return len(self._pages)

    async def get(self, d: Dispatcher, key: tuple, insts: Sequence[Any],
                  render: Callable[[Any], tuple]) -> Pieces:
        hit = self._pages.get(key)
        if hit is not None and len(hit[0]) == len(insts) and all(map(is_, hit[0], insts)):
            return hit[1]
        items, _offsets = await d.renders.items(None, insts, render)
        body, own = _page_pieces(items)
        if hit is not None:
            self._drop(key)
        if all(isinstance(i, Instance) for i in insts):
            self._pages[key] = (tuple(insts), body, own)
            self._pieces += len(body.pieces)
            self._own += own
            while self._pieces > PAGE_PIECES or self._own > PAGE_OWN_BYTES \
                    or len(self._pages) > PAGE_MAX:
                self._drop(next(iter(self._pages)))
        return body

    def _drop(self, key: tuple) -> None:
        _insts, body, own = self._pages.pop(key)
        self._pieces -= len(body.pieces)
        self._own -= own


MERGE_BELOW = 1024               # bytes: shorter pieces next to each other are joined


def _page_pieces(items: Sequence[tuple]) -> tuple[Pieces, int]:
    """The items' pieces with each run of short pieces that every item shares (the
    VALUE.INSTANCEWITHPATH tags, the NAMESPACEPATH, between two INSTANCENAMEs) joined
    into one bytes object the whole page shares: a page of 1,000 systems is ~4,000
    pieces instead of ~6,000, and no system's bytes are copied (its INSTANCENAME and
    INSTANCE stay its own cached bytes). The transport writes at most IOV_MAX (1,024)
    pieces per writev() and waits a loop turn for the next. Joining every short run,
    INSTANCENAMEs included, made ~2,000 pieces and measured ~10% faster per page, but
    kept a copy of ~500 bytes per system as long as the page (issue 16: RSS per
    domain). Returns the pieces and the bytes joined here."""
    seen: dict[int, int] = {}
    for item in items:
        for piece in item:
            if len(piece) < MERGE_BELOW:
                seen[id(piece)] = seen.get(id(piece), 0) + 1
    shared_at = 2 if len(items) > 1 else 1     # a piece in more than one item
    runs: dict[bytes, bytes] = {}              # one object per distinct joined run
    pieces: list[bytes] = []
    short: list[bytes] = []

    def flush() -> None:
        if len(short) == 1:
            pieces.append(short[0])
        else:
            joined = b"".join(short)
            pieces.append(runs.setdefault(joined, joined))
        short.clear()

    for item in items:
        for piece in item:
            if len(piece) < MERGE_BELOW and seen[id(piece)] >= shared_at:
                short.append(piece)
                continue
            if short:
                flush()
            pieces.append(piece)
    if short:
        flush()
    out = Pieces()
    out.add_all(pieces)
    return out, sum(len(run) for run in runs.values())


class _Maker:
    """How the pages of one streaming context are made (a Cursor's `maker`)."""
    __slots__ = ("key", "render")

    def __init__(self, key: tuple, render: Callable[[Any], tuple]):
        self.key, self.render = key, render


async def _page(d: Dispatcher, cursor: Cursor, count: int) -> Pieces:
    """The next page of at most `count` objects: keys are taken until that many
    objects are found or none are left (a key whose object went away gives none)."""
    maker: _Maker = cursor.maker
    out = Pieces()
    found = 0
    while True:
        step = cursor.next(count - found)
        if step is None:
            return out
        leaf, prov, keys, start, stop = step
        insts = keys[start:stop] if prov is None else \
            await prov.instances_of(leaf, keys, start, stop)
        if insts:
            out.extend(await d.pages.get(d, maker.key + (leaf, start, stop), insts,
                                         maker.render))
            found += len(insts)


async def _serve(d: Dispatcher, cid: str, cursor: Cursor, count: int) -> Result:
    """A page of the streaming context `cid` (busy meanwhile); a failure closes it."""
    try:
        body = await _page(d, cursor, count)
    except BaseException:
        d.pulls.release(cid, True)
        raise
    eos = cursor.done
    out = d.pulls.release(cid, eos)
    return pull_result(body, eos or out is None, out)


async def _open_stream(d: Dispatcher, ns: Namespace, p: dict, ctx: OperationContext,
                       kind: str, cursor: Cursor) -> Result:
    timeout = check_open(d, p)
    count = p["MaxObjectCount"]
    d.pulls.check_count(count)
    if cursor.total <= count:             # one response: no context
        return pull_result(await _page(d, cursor, count), True, None)
    cid = d.pulls.open_stream(ns.name, kind, cursor, count, timeout, ctx.client)
    return await _serve(d, cid, cursor, count)


def check_open(d: Dispatcher, p: dict) -> float:
    if p["FilterQueryLanguage"] is not None or p["FilterQuery"] is not None:
        raise CIMError(pywbem.CIM_ERR_FILTERED_ENUMERATION_NOT_SUPPORTED,
                       "filtered enumerations are not supported")
    if p["ContinueOnError"]:
        raise CIMError(pywbem.CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED,
                       "ContinueOnError is not supported")
    return d.pulls.check_timeout(p["OperationTimeout"])


def pull_result(body: Sequence | Pieces, eos: bool, ctx_id: str | None,
                offsets: Sequence[int] | None = None) -> Result:
    """The IRETURNVALUE (a page, or items: text or pieces) and EndOfSequence /
    EnumerationContext."""
    params = [w.paramvalue_xml("EndOfSequence", eos, "boolean")]
    if not eos:
        params.append(w.paramvalue_xml("EnumerationContext", ctx_id, "string"))
    if isinstance(body, Pieces):
        return Result(body, params)
    if body and type(body[0]) is str:     # ExecQuery's items: text
        return Result(list(body), params)
    return Result(pieces_of(body, offsets), params)


def _open_items(d: Dispatcher, ns: Namespace, p: dict, ctx: OperationContext, kind: str,
                items: Sequence, offsets: Sequence[int] | None = None) -> Result:
    """An Open whose whole result is rendered: slices of `items` handed out."""
    timeout = check_open(d, p)
    ctx_id, chunk, eos = d.pulls.open(ns.name, kind, items, p["MaxObjectCount"],
                                      timeout, ctx.client, offsets)
    return pull_result(chunk, eos, ctx_id,
                       None if offsets is None else offsets[:len(chunk) + 1])


async def op_OpenEnumerateInstances(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    check_open(d, p)
    cls = d.get_class(ns, p["ClassName"])
    view = d.views.get(ns, cls.classname, p["DeepInheritance"], p["PropertyList"],
                       p["IncludeClassOrigin"])
    render = with_path(view, d.paths, d.host, ns.name, IWP, d.repo.namespace)
    segments = [(leaf, prov, await prov.enumerate_keys(leaf))
                for leaf, prov in d._providers_for(ns, cls.classname)]
    maker = _Maker(("iwp", ns.name, d.host, view), render)
    return await _open_stream(d, ns, p, ctx, "instances", Cursor(segments, maker))


async def op_OpenEnumerateInstancePaths(d: Dispatcher, ns: Namespace, p: dict,
                                        ctx) -> Result:
    check_open(d, p)
    cls = d.get_class(ns, p["ClassName"])
    segments: list[tuple[str, Any, Sequence]] = []
    for leaf, prov in d._providers_for(ns, cls.classname):
        if type(prov).enumerate_instance_names is Provider.enumerate_instance_names:
            segments.append((leaf, prov, await prov.enumerate_keys(leaf)))
        else:          # the provider lists paths of its own: those are the objects
            segments.append((leaf, None, tuple(
                Named(path) for path in await prov.enumerate_instance_names(leaf))))
    maker = _Maker(("paths", ns.name, d.host), instance_path(d.paths, d.host, ns.name))
    return await _open_stream(d, ns, p, ctx, "paths", Cursor(segments, maker))


async def op_OpenAssociatorInstances(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    check_open(d, p)
    items, offsets = await d._with_paths(
        ns, await d._associators(ns, p["InstanceName"], p), p, True, None, IWP)
    return _open_items(d, ns, p, ctx, "instances", items, offsets)


async def op_OpenAssociatorInstancePaths(d: Dispatcher, ns: Namespace, p: dict,
                                         ctx) -> Result:
    check_open(d, p)
    source = d._source(ns, p["InstanceName"])
    await d.get_instance(source)
    items = [encode(w.instancepath_xml(t, d.host))
             for t in await d._associator_paths(ns, source, p)]
    return _open_items(d, ns, p, ctx, "paths", items)


async def op_OpenReferenceInstances(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    check_open(d, p)
    items, offsets = await d._with_paths(
        ns, await d._reference_instances(ns, p["InstanceName"], p), p, True, None, IWP)
    return _open_items(d, ns, p, ctx, "instances", items, offsets)


async def op_OpenReferenceInstancePaths(d: Dispatcher, ns: Namespace, p: dict,
                                        ctx) -> Result:
    check_open(d, p)
    items = [encode(w.instancepath_xml(a.path, d.host))
             for a in await d._reference_instances(ns, p["InstanceName"], p)]
    return _open_items(d, ns, p, ctx, "paths", items)


async def _pull(d: Dispatcher, ns: Namespace, p: dict, ctx, kind: str) -> Result:
    cid, count = p["EnumerationContext"], p["MaxObjectCount"]
    cursor = d.pulls.stream(ns.name, kind, cid, count, ctx.client)
    if cursor is not None:
        return await _serve(d, cid, cursor, count)
    chunk, offsets, eos, ctx_id = d.pulls.pull_with_offsets(ns.name, kind, cid, count,
                                                            ctx.client)
    return pull_result(chunk, eos, ctx_id, offsets)


async def op_PullInstancesWithPath(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    return await _pull(d, ns, p, ctx, "instances")


async def op_PullInstancePaths(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    return await _pull(d, ns, p, ctx, "paths")


async def op_CloseEnumeration(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    d.pulls.close(ns.name, p["EnumerationContext"], ctx.client)
    return Result(None)
