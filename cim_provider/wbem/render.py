"""Instances into response pieces (UTF-8 bytes), rendered once and reused.

- `body_of` / `name_of`: the INSTANCE and INSTANCENAME of an unfiltered instance; an
  `Instance` keeps them (instance.py), so a provider's unchanged instance is rendered
  once and sent many times.
- `Views`: what a request asks to see of a class (PropertyList, DeepInheritance,
  IncludeClassOrigin), resolved once per request shape instead of once per instance;
  a view that keeps every property of an instance is the instance itself.
- `cut_body`: a PropertyList view cut out of the cached INSTANCE bytes. Every text
  and attribute value in them is escaped, so `<PROPERTY` only ever starts a
  property: the bytes are those `instance_xml` writes for the view (round-trip tests).
- `Renders`: whole enumerations rendered once per (kind, class, view, host) and
  reused while the provider returns the very same tuple (provider.py's contract).

Long loops give the event loop back every few milliseconds (`Pacer`).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from pywbem import CIMInstance, CIMInstanceName

from . import writer as w
from .context import CHUNK, Pieces
from .instance import Instance
from .provider import path_key
from .repository import Namespace
from .views import instance_view

UTF8 = "utf-8"

VNI = (b"<VALUE.NAMEDINSTANCE>", b"</VALUE.NAMEDINSTANCE>")
IWP = (b"<VALUE.INSTANCEWITHPATH>", b"</VALUE.INSTANCEWITHPATH>")
OWP = (b"<VALUE.OBJECTWITHPATH>", b"</VALUE.OBJECTWITHPATH>")
_IP_END = b"</INSTANCEPATH>"
_INSTANCE_END = b"</INSTANCE>"

PACE_SECONDS = 0.01        # longest stretch of rendering before the loop gets a turn
_PACE_EVERY = 64           # instances between two looks at the clock


def encode(text: str) -> bytes:
    return text.encode(UTF8, "replace")


def body_of(inst: CIMInstance) -> bytes:
    """INSTANCE of the unfiltered instance (kept on an Instance)."""
    if isinstance(inst, Instance):
        body = inst._body
        if body is None:
            text = inst.body_text()
            if text is None:
                shaped = inst.shaped()
                text = w.instance_xml(inst) if shaped is None else \
                    instance_xml_of(inst.classname, *shaped)
            body = inst._body = encode(text)
        return body
    return encode(w.instance_xml(inst))


# ---- writing an Instance from its values ---------------------------------------------------
# What `w.instance_xml` writes for the properties CIMProperty(name, value, type=decl.type,
# ...) would make, written from the values themselves for the common types: a string,
# boolean or integer in range (or a list of them) gives the text CIMProperty's typed value
# gives; anything else (reals, datetimes, references, embedded objects, values the class
# type would refuse) is written through a made CIMProperty, which also raises as before.

_INT_RANGE = {"uint8": (0, 0xFF), "uint16": (0, 0xFFFF), "uint32": (0, 0xFFFFFFFF),
              "uint64": (0, 0xFFFFFFFFFFFFFFFF), "sint8": (-0x80, 0x7F),
              "sint16": (-0x8000, 0x7FFF), "sint32": (-0x80000000, 0x7FFFFFFF),
              "sint64": (-0x8000000000000000, 0x7FFFFFFFFFFFFFFF)}


_MEMO_MAX = 64            # values of one property remembered; more: it varies per instance


def _tags(shape: Any) -> list:
    """Per property: [start tag, end tag, type, is array, memo], or None: written the
    slow way. `memo` maps a value (its type with it: True is not 1) to the property's
    XML, for the properties most instances share values of (EnabledState, the class
    name, ...); it is dropped (None) once a property shows too many values."""
    tags = shape.tags
    if tags is None:
        out: list[Any] = []
        for d in shape.decls:
            if d.embedded_object or not (d.type in _INT_RANGE or d.type in ("string", "boolean")):
                out.append(None)
                continue
            tag = "PROPERTY.ARRAY" if d.is_array else "PROPERTY"
            out.append([f'<{tag} NAME="{w.esc(d.name)}" TYPE="{d.type}">', f"</{tag}>",
                        d.type, bool(d.is_array), {}])
        tags = shape.tags = out
    return tags


def _property_xml(tag: list, v: Any) -> str | None:
    """A property's XML from its value, or None: the slow way."""
    start, end, kind, array, _memo = tag
    if not array:
        text = _text(kind, v)
        return None if text is None else f"{start}<VALUE>{text}</VALUE>{end}"
    if type(v) is list:
        values_xml = [_element(kind, x) for x in v]
        if None not in values_xml:
            return start + "<VALUE.ARRAY>" + "".join(values_xml) + "</VALUE.ARRAY>" + end   # type: ignore[arg-type]  # reason: None excluded
    return None


def _text(kind: str, v: Any) -> str | None:
    """The VALUE text of a scalar, or None when it must go the slow way."""
    if kind == "string":
        return w.esc(v) if type(v) is str else None
    if kind == "boolean":
        return ("TRUE" if v else "FALSE") if type(v) is bool else None
    if isinstance(v, int) and not isinstance(v, bool):
        lo, hi = _INT_RANGE[kind]
        if lo <= v <= hi:
            return str(int(v))
    return None


def _element(kind: str, v: Any) -> str | None:
    """An array element's VALUE (VALUE.NULL for None), or None: the slow way."""
    if v is None:
        return "<VALUE.NULL></VALUE.NULL>"
    text = _text(kind, v)
    return None if text is None else f"<VALUE>{text}</VALUE>"


def instance_xml_of(classname: str, shape: Any, values: tuple) -> str:
    """`w.instance_xml` of the instance `shape` would make from `values`."""
    tags = _tags(shape)
    parts = [f'<INSTANCE CLASSNAME="{w.esc(classname)}">']
    for i, v in enumerate(values):
        tag = tags[i]
        if tag is not None:
            memo = tag[4]
            key: Any = None
            if memo is not None:
                cls = type(v)
                key = (cls, v) if cls in (str, int, bool) else \
                    (cls, tuple(v)) if cls is list and all(type(x) in (str, int) for x in v) \
                    else None
                if key is not None:
                    hit = memo.get(key)
                    if hit is not None:
                        parts.append(hit)
                        continue
            xml = _property_xml(tag, v)
            if xml is not None:
                parts.append(xml)
                if key is not None:
                    if len(memo) < _MEMO_MAX:
                        memo[key] = xml
                    else:
                        tag[4] = None
                continue
        parts.append(w.property_xml(shape.prop(i, v)))
    parts.append("</INSTANCE>")
    return "".join(parts)


def name_of(inst: Any) -> bytes:
    """INSTANCENAME of the instance's path (kept on an Instance, with its namespace)."""
    if isinstance(inst, Instance):
        name = inst._name
        if name is None:
            parts = inst.path_parts()
            if parts is not None and all(type(v) is str for v in parts[2]):
                name = inst._name = encode(instancename_of(parts[0], parts[1], parts[2]))
                inst._ns = parts[3]
            else:
                path = inst.path
                name = inst._name = encode(w.instancename_xml(path))
                inst._ns = path.namespace
        return name
    return encode(w.instancename_xml(inst.path))


def instancename_of(classname: str, keys: Sequence[str], values: Sequence[str]) -> str:
    """`w.instancename_xml` of a path whose key values are all strings. What comes
    before and after the last key's value is kept per class, key names and other key
    values (the last key is usually the one that differs: a system's Name)."""
    if not keys or len(keys) != len(values):
        return _instancename_text(classname, keys, values)
    fixed = (classname, tuple(keys), tuple(values[:-1]))
    around = _NAME_AROUND.get(fixed)
    if around is None:
        if len(_NAME_AROUND) >= _NAME_AROUND_MAX:     # full: they vary per instance
            return _instancename_text(classname, keys, values)
        head, _, tail = _instancename_text(classname, keys, (*values[:-1], "\ue000")
                                           ).rpartition("\ue000")
        around = _NAME_AROUND[fixed] = (head, tail)
    return around[0] + w.esc(values[-1]) + around[1]


_NAME_AROUND: dict[tuple, tuple[str, str]] = {}
_NAME_AROUND_MAX = 64


def _instancename_text(classname: str, keys: Sequence[str], values: Sequence[str]) -> str:
    return (f'<INSTANCENAME CLASSNAME="{w.esc(classname)}">' + "".join(
        f'<KEYBINDING NAME="{w.esc(k)}"><KEYVALUE VALUETYPE="string" TYPE="string">'
        f"{w.esc(v)}</KEYVALUE></KEYBINDING>" for k, v in zip(keys, values))
        + "</INSTANCENAME>")


def namespace_of(inst: Any) -> str | None:
    if isinstance(inst, Instance):
        return inst.path_namespace()
    return inst.path.namespace if inst.path is not None else None


class Pacer:
    """Yields to the event loop when a loop has held it for PACE_SECONDS."""

    __slots__ = ("_since", "_n")

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._n = 0

    async def tick(self) -> None:
        self._n += 1
        if self._n % _PACE_EVERY == 0 and time.perf_counter() - self._since > PACE_SECONDS:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


# ---- views ------------------------------------------------------------------------------

class View:
    """What one request shape asks to see: the allowed property names (lower case;
    None: all) and IncludeClassOrigin, resolved once per shape. `cut`: views are cut
    from the cached bytes (a PropertyList without class origin)."""

    __slots__ = ("ns", "allowed", "class_origin", "plain", "cut", "_covers")

    def __init__(self, ns: Namespace, allowed: set[str] | None, class_origin: bool):
        self.ns = ns
        self.allowed = allowed
        self.class_origin = class_origin
        self.plain = allowed is None and not class_origin     # every view is the instance
        self.cut = allowed is not None and not class_origin
        self._covers: dict[int, tuple[Any, bool]] = {}

    def covers(self, cls: Any) -> bool:
        """`allowed` holds every property the class `cls` declares."""
        hit = self._covers.get(id(cls))
        if hit is None or hit[0] is not cls:
            assert self.allowed is not None
            allowed = self.allowed
            hit = self._covers[id(cls)] = (cls, all(n.lower() in allowed
                                                    for n in cls.properties))
        return hit[1]

    def body(self, inst: CIMInstance, ns: Namespace | None = None) -> bytes:
        """INSTANCE of the view of `inst`; `ns`: where its class origins are looked
        up (default: the request's namespace)."""
        if self.plain:
            return body_of(inst)
        if self.cut:
            assert self.allowed is not None
            cls = inst.built_from() if isinstance(inst, Instance) else None
            if cls is not None and self.covers(cls):
                return body_of(inst)        # keeps all it has: the instance itself
            cut = cut_body(body_of(inst), self.allowed)
            if cut is not None:
                return cut
        view = instance_view(ns or self.ns, inst, self.allowed, self.class_origin)
        return encode(w.instance_xml(view, class_origin=self.class_origin))


class Views:
    """View per request shape, kept (a few hundred shapes at most)."""

    MAX = 256

    def __init__(self) -> None:
        self._views: dict[tuple, View] = {}

    def get(self, ns: Namespace, classname: str, deep: bool,
            property_list: Sequence[str] | None, class_origin: bool) -> View:
        key = (ns.name, classname.lower(), bool(deep),
               None if property_list is None else tuple(property_list), bool(class_origin))
        view = self._views.get(key)
        if view is None or view.ns is not ns:
            allowed = None if property_list is None else {p.lower() for p in property_list}
            if not deep:
                own = {n.lower() for n in ns.require(classname).properties}
                allowed = own if allowed is None else allowed & own
            if len(self._views) >= self.MAX:
                self._views.clear()
            view = self._views[key] = View(ns, allowed, class_origin)
        return view


def cut_body(body: bytes, allowed: set[str]) -> bytes | None:
    """The INSTANCE `body` with only the properties named in `allowed` (lower case);
    None when a property name is written with references (never for CIM names)."""
    start = body.index(b">") + 1                       # end of <INSTANCE CLASSNAME="...">
    parts = body[start:len(body) - len(_INSTANCE_END)].split(b"<PROPERTY")
    out = [body[:start]]
    for part in parts[1:]:
        q = part.index(b'NAME="') + 6
        name = part[q:part.index(b'"', q)]
        if b"&" in name:
            return None
        if name.decode(UTF8).lower() in allowed:
            out.append(b"<PROPERTY" + part)
    out.append(_INSTANCE_END)
    return b"".join(out)


# ---- paths and wrappers -------------------------------------------------------------------

class Paths:
    """NAMESPACEPATH openings per (host, namespace), as bytes."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], bytes] = {}

    def open(self, host: str, namespace: str) -> bytes:
        """`<INSTANCEPATH><NAMESPACEPATH>...</NAMESPACEPATH>`: an INSTANCENAME follows."""
        key = (host, namespace)
        got = self._open.get(key)
        if got is None:
            if len(self._open) > 64:
                self._open.clear()
            got = self._open[key] = encode("<INSTANCEPATH>" + w.namespacepath_xml(host,
                                                                                  namespace))
        return got

    def of(self, inst: Any, host: str, default_ns: str) -> tuple[bytes, bytes, bytes]:
        """INSTANCEPATH of an instance, as three pieces."""
        return self.open(host, namespace_of(inst) or default_ns), name_of(inst), _IP_END


# ---- whole enumerations -----------------------------------------------------------------

class _Entry:
    __slots__ = ("source", "pieces", "sizes")

    def __init__(self, source: tuple, pieces: Any, sizes: list[int] | None):
        self.source, self.pieces, self.sizes = source, pieces, sizes


class Renders:
    """Rendered enumerations by (kind, namespace, leaf, view, host): reused while the
    provider returns the same tuple of Instances. At most MAX entries are kept."""

    MAX = 64

    def __init__(self) -> None:
        self._entries: dict[tuple, _Entry] = {}

    def _hit(self, key: tuple | None, insts: Iterable[Any]) -> _Entry | None:
        entry = self._entries.get(key) if key is not None else None
        return entry if entry is not None and entry.source is insts else None

    def _keep(self, key: tuple | None, insts: Iterable[Any], pieces: Any,
              sizes: list[int] | None, cacheable: bool) -> _Entry:
        entry = _Entry(insts if type(insts) is tuple else (), pieces, sizes)
        if key is not None and cacheable and type(insts) is tuple:
            if len(self._entries) >= self.MAX:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = entry
        return entry

    async def flat(self, key: tuple | None, insts: Iterable[Any],
                   render: Callable[[Any], Sequence[bytes]]) -> Pieces:
        """The pieces of every instance, one after the other (EnumerateInstances,
        EnumerateInstanceNames): each instance's own cached bytes, nothing joined. Kept
        joined into chunks, the INSTANCENAMEs of 10,000 systems were a second copy of
        3 MB (0.3 KiB per domain, issue 16) for ~1 ms less per EnumerateInstanceNames."""
        entry = self._hit(key, insts)
        if entry is not None:
            return entry.pieces
        out = Pieces()
        cacheable = True
        pace = Pacer()
        for inst in insts:
            out.add_item(render(inst))
            cacheable = cacheable and isinstance(inst, Instance)
            await pace.tick()
        return self._keep(key, insts, out, None, cacheable).pieces

    async def items(self, key: tuple | None, insts: Iterable[Any],
                    render: Callable[[Any], tuple]) -> tuple[list[tuple], list[int]]:
        """One item (a tuple of pieces) per instance and the byte offset where each
        item starts (plus the total), for pull operations."""
        entry = self._hit(key, insts)
        if entry is not None:
            assert entry.sizes is not None
            return entry.pieces, entry.sizes
        items: list[tuple] = []
        offsets = [0]
        total = 0
        cacheable = True
        pace = Pacer()
        for inst in insts:
            item = render(inst)
            items.append(item)
            for piece in item:
                total += len(piece)
            offsets.append(total)
            cacheable = cacheable and isinstance(inst, Instance)
            await pace.tick()
        entry = self._keep(key, insts, items, offsets, cacheable)
        return items, offsets


def named_instance(view: View) -> Callable[[CIMInstance], tuple[bytes, ...]]:
    """VALUE.NAMEDINSTANCE pieces of an instance, as `view` shows it."""
    def render(inst: CIMInstance) -> tuple[bytes, ...]:
        return VNI[0], name_of(inst), view.body(inst), VNI[1]
    return render


def with_path(view: View, paths: Paths, host: str, default_ns: str,
              wrap: tuple[bytes, bytes],
              namespace: Callable[[str], Namespace] | None = None) -> Callable[[Any], tuple]:
    """VALUE.INSTANCEWITHPATH / VALUE.OBJECTWITHPATH pieces of an instance; a view
    with class origins looks them up in `namespace(the instance's namespace)` when
    given, else in the request's."""
    def render(inst: CIMInstance) -> tuple[bytes, ...]:
        nsname = namespace_of(inst) or default_ns
        own = namespace(nsname) if namespace is not None and not view.plain else None
        return (wrap[0], paths.open(host, nsname), name_of(inst), _IP_END,
                view.body(inst, own), wrap[1])
    return render


def instance_path(paths: Paths, host: str, default_ns: str) -> Callable[[Any], tuple]:
    """INSTANCEPATH pieces of an instance (or of anything with a `path`)."""
    def render(inst: Any) -> tuple[bytes, ...]:
        return paths.of(inst, host, default_ns)
    return render


def pieces_of(items: Sequence[Any], offsets: Sequence[int] | None = None) -> Pieces:
    """Pieces of items (UTF-8 pieces or tuples of them); `offsets`: where each item
    starts and the last ends, which spares looking at every piece."""
    out = Pieces()
    if offsets is None:
        for item in items:
            out.add_item(item if type(item) is tuple else (item,))
        return out
    pieces: list[bytes] = []
    cuts: list[int] = []
    last = offsets[0]
    for i, item in enumerate(items):
        if type(item) is tuple:
            pieces += item
        else:
            pieces.append(item)
        end = offsets[i + 1]
        if end - last >= CHUNK:
            cuts.append(len(pieces))
            last = end
    out.pieces, out.cuts = pieces, cuts
    out.size, out.since = offsets[len(items)] - offsets[0], offsets[len(items)] - last
    return out


# ---- the dispatcher's small helpers ---------------------------------------------------------

def put(out: Pieces, body: Pieces | list) -> Pieces:
    """`body` after `out` (returned): Pieces as they are, bytes as they are, text
    encoded."""
    if isinstance(body, Pieces):
        out.extend(body)
    else:
        out.add_all(piece if type(piece) is bytes else encode(piece) for piece in body)
    return out


def name_item(inst: CIMInstance) -> tuple[bytes]:
    return (name_of(inst),)


class Named:
    """A path from a provider's enumerate_instance_names, rendered like an instance's."""
    __slots__ = ("path",)

    def __init__(self, path: CIMInstanceName):
        self.path = path


class PathKeys:
    """path_key of reference values, each object's once per request (10,000
    HostedDependency instances share the host's path object)."""
    __slots__ = ("ns", "_seen")

    def __init__(self, namespace: str):
        self.ns = namespace
        self._seen: dict[int, tuple[CIMInstanceName, tuple]] = {}

    def of(self, path: CIMInstanceName) -> tuple:
        hit = self._seen.get(id(path))
        if hit is None or hit[0] is not path:
            hit = self._seen[id(path)] = (path, path_key(path, self.ns))
        return hit[1]
