"""Compact provider instances: built from values, rendered once, properties on demand.

A server with 10,000 domains keeps a VIRT_ComputerSystem per domain, and as many of
each class a client has asked for. Held as pywbem objects one costs ~6 KB (15
CIMProperty objects, a NocaseDict, its path) beside its ~1.5 KB of CIM-XML. An
`Instance` keeps what it was built from (the class's declarations, shared, and a
tuple of values), and once the dispatcher has rendered it, its INSTANCE and
INSTANCENAME as UTF-8 bytes; `properties` and `path` are made again each time they
are read, for the rare paths that need objects (PropertyList with class origin, WQL,
lifecycle indications). Made properties are exactly those `CIMProperty(name, value,
type=decl.type, ...)` gives, as pywbem's CIMInstance would hold them. Subclasses
may keep less still (providers/computer_system.py builds values from its record).

Instances are immutable once a provider returns them (provider.py). Writing through
the CIMInstance API (`inst[name] = v`, `inst.properties = ...`, `inst.path = ...`)
turns an Instance into an ordinary one holding its properties, and forgets its
rendered XML.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pywbem import CIMClass, CIMInstance, CIMInstanceName, CIMProperty

_NocaseDict = type(CIMInstance("X").properties)     # pywbem's NocaseDict, as it uses it


class Shape:
    """The declarations of the properties an instance has values for, in order:
    shared by every instance of one class built with the same property names."""

    __slots__ = ("cls", "decls", "index", "refs", "tags")

    def __init__(self, cls: CIMClass, names: tuple[str, ...]):
        self.cls = cls
        self.decls = tuple(cls.properties[n] for n in names)   # KeyError: not declared
        self.index = {d.name.lower(): i for i, d in enumerate(self.decls)}
        self.refs = tuple(i for i, d in enumerate(self.decls) if d.type == "reference")
        self.tags: Any = None           # render.py's: how each property is written

    def prop(self, i: int, value: Any) -> CIMProperty:
        d = self.decls[i]
        return CIMProperty(d.name, value, type=d.type, reference_class=d.reference_class,
                           embedded_object=d.embedded_object, is_array=d.is_array)

    def properties(self, values: tuple) -> Any:
        out = _NocaseDict()
        for i, value in enumerate(values):
            out[self.decls[i].name] = self.prop(i, value)
        return out


_SHAPES: dict[tuple[int, tuple[str, ...]], Shape] = {}
_MAX_SHAPES = 4096


def shape_of(cls: CIMClass, names: tuple[str, ...]) -> Shape:
    """The shared Shape of `cls` with properties `names` (validated on first use)."""
    key = (id(cls), names)
    shape = _SHAPES.get(key)
    if shape is None or shape.cls is not cls:
        if len(_SHAPES) >= _MAX_SHAPES:
            _SHAPES.clear()
        shape = _SHAPES[key] = Shape(cls, names)
    return shape


def split_values(cls: CIMClass, values: Mapping[str, Any]) -> tuple[Shape, tuple]:
    """(shape, values) of the non-None `values`; unknown names are a KeyError."""
    names = tuple(k for k, v in values.items() if v is not None)
    return shape_of(cls, names), tuple(values[k] for k in names)


class PathShape:
    """Class, namespace, host and key names of instance paths, shared; the key values
    are kept per instance."""

    __slots__ = ("classname", "namespace", "host", "keys")

    def __init__(self, classname: str, namespace: str | None, host: str | None,
                 keys: tuple[str, ...]):
        self.classname, self.namespace, self.host, self.keys = classname, namespace, host, keys

    def path(self, values: tuple) -> CIMInstanceName:
        return CIMInstanceName(self.classname, dict(zip(self.keys, values)),
                               namespace=self.namespace, host=self.host)


_PATHS: dict[tuple, PathShape] = {}


def split_path(path: CIMInstanceName) -> tuple[PathShape, tuple]:
    kb = path.keybindings
    key = (path.classname, path.namespace, path.host, tuple(kb.keys()))
    shape = _PATHS.get(key)
    if shape is None:
        if len(_PATHS) >= _MAX_SHAPES:
            _PATHS.clear()
        shape = _PATHS[key] = PathShape(*key)
    return shape, tuple(kb.values())


# The properties made last: id(instance) -> (instance, properties); see Instance.properties
_RECENT: dict[int, tuple[Any, Any]] = {}
_MAX_RECENT = 64


def forget_classes() -> None:
    """Drop the shared shapes and the properties made last, which hold classes. A
    server calls it when it closes, so that its repository goes with it: the caches
    are per process, the classes per server (a process that starts servers one after
    another, the tests', kept up to 4,096 shapes' classes). Another server still
    running makes what it needs again."""
    _SHAPES.clear()
    _RECENT.clear()


class Instance(CIMInstance):
    """A provider's instance, immutable once returned; see the module docstring.

    Built with `build_instance` (or a subclass) it is lazy; built with CIMInstance's
    own constructor it holds its properties as any CIMInstance. `_body` and `_name`
    are the dispatcher's renderings (UTF-8 INSTANCE and INSTANCENAME), `_ns` the
    namespace of its path once rendered.
    """
    __slots__ = ("_src", "_shape", "_psrc", "_pshape", "_body", "_name", "_ns")

    _src: Any
    _shape: Shape | None
    _psrc: tuple | None
    _pshape: PathShape | None
    _body: bytes | None
    _name: bytes | None
    _ns: str | None

    def __init__(self, classname: str, properties: Any = None, qualifiers: Any = None,
                 path: CIMInstanceName | None = None):
        self._src = self._shape = self._psrc = self._pshape = None
        self._body = self._name = self._ns = None
        super().__init__(classname, properties, qualifiers, path)

    @classmethod
    def lazy(cls, classname: str) -> Any:
        """An instance of `classname` without properties or path, for subclasses and
        build_instance to fill in."""
        inst = cls.__new__(cls)
        inst._blank(classname)
        return inst

    def _blank(self, classname: str) -> None:
        """What CIMInstance(classname) sets, without its setters (a tenth of the time,
        paid once per instance built): pywbem 1.9's slots (pinned <1.10)."""
        base: Any = self            # pywbem's slots, which mypy does not see
        base._classname = classname
        base._properties = base._qualifiers = base._path = None
        self._src = self._shape = self._psrc = self._pshape = None
        self._body = self._name = self._ns = None

    # ---- made on demand ------------------------------------------------------------

    def _lazy_properties(self) -> Any:
        """The properties made from what the instance keeps; None when it holds them."""
        shape = self._shape
        return None if shape is None else shape.properties(self._src)

    def _is_lazy(self) -> bool:
        """Subclasses that make their properties: whether they still do."""
        return False

    def shaped(self) -> tuple[Shape, tuple] | None:
        """(shape, values) the properties would be made from, for writing them without
        making them (render.py); None for an ordinary instance."""
        shape = self._shape
        return None if shape is None else (shape, self._src)

    def body_text(self) -> str | None:
        """The INSTANCE text written some faster way than from `shaped` (a subclass's
        template, render.py's body_of); None: write it the usual way."""
        return None

    def _lazy_path(self) -> CIMInstanceName | None:
        """The path made from what the instance keeps; None when it holds it."""
        shape = self._pshape
        return None if shape is None else shape.path(self._psrc or ())

    @property
    def properties(self) -> Any:
        if self._shape is None and not self._is_lazy():
            return CIMInstance.properties.fget(self)
        # Made again on each read: the last few made are kept for a moment, so code
        # that reads an instance several times in a row (inst[a], inst[b], a loop
        # comparing two versions) does not make them each time.
        hit = _RECENT.get(id(self))
        if hit is not None and hit[0] is self:
            return hit[1]
        props = self._lazy_properties()
        if props is None:
            return CIMInstance.properties.fget(self)
        if len(_RECENT) >= _MAX_RECENT:
            try:
                _RECENT.pop(next(iter(_RECENT)), None)
            except (RuntimeError, StopIteration):   # changed or emptied meanwhile (another
                pass                                 # thread, forget_classes): next time
        _RECENT[id(self)] = (self, props)
        return props

    @properties.setter
    def properties(self, properties: Any) -> None:
        self._own()
        CIMInstance.properties.fset(self, properties)

    @property
    def path(self) -> Any:
        path = self._lazy_path()
        return path if path is not None else CIMInstance.path.fget(self)

    @path.setter
    def path(self, path: Any) -> None:
        self._own()
        CIMInstance.path.fset(self, path)

    def __getitem__(self, key: str) -> Any:
        shape = self._shape
        if shape is not None and isinstance(key, str):
            i = shape.index.get(key.lower())
            if i is not None:
                return shape.prop(i, self._src[i]).value
        return CIMInstance.__getitem__(self, key)

    def built_from(self) -> CIMClass | None:
        """The class the instance was built against, so that it has no property the
        class does not declare; None for an ordinary instance (it may hold anything).
        Lazy subclasses return the class they type their values with."""
        return self._shape.cls if self._shape is not None else None

    def reference_values(self) -> list[tuple[str, Any]]:
        """(name, value) of every non-NULL reference property, without making them all."""
        shape = self._shape
        if shape is not None:
            return [(shape.decls[i].name, self._src[i]) for i in shape.refs]
        return [(p.name, p.value) for p in self.properties.values()
                if p.type == "reference" and p.value is not None]

    def path_parts(self) -> tuple[str, tuple[str, ...], tuple, str | None] | None:
        """(class name, key names, key values, namespace) of the path without making it,
        when the instance keeps them so (render.py writes INSTANCENAME from them)."""
        shape = self._pshape
        if shape is None or shape.host is not None:
            return None
        return shape.classname, shape.keys, self._psrc or (), shape.namespace

    def path_namespace(self) -> str | None:
        """The namespace of the path, without making it when the instance knows it."""
        if self._pshape is not None:
            return self._pshape.namespace
        if self._ns is not None:
            return self._ns
        path = self.path
        return None if path is None else path.namespace

    # ---- writes make an ordinary instance ------------------------------------------

    def _own(self) -> None:
        """Hold properties and path from now on, and forget the rendered XML."""
        props, path = self._lazy_properties(), self._lazy_path()
        if props is not None:
            _RECENT.pop(id(self), None)
        self._src = self._shape = self._psrc = self._pshape = None
        self._body = self._name = self._ns = None
        self._stop_lazy()
        if props is not None:
            CIMInstance.properties.fset(self, props)
        if path is not None:
            CIMInstance.path.fset(self, path)

    def _stop_lazy(self) -> None:
        """Subclasses: stop making properties and path from what they keep."""

    def __setitem__(self, key: str, value: Any) -> None:
        self._own()
        CIMInstance.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._own()
        CIMInstance.__delitem__(self, key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._own()
        CIMInstance.update(self, *args, **kwargs)

    def update_existing(self, *args: Any, **kwargs: Any) -> None:
        self._own()
        CIMInstance.update_existing(self, *args, **kwargs)


def build_instance(cls: CIMClass, values: Mapping[str, Any],
                   path: CIMInstanceName | None = None) -> Instance:
    """An instance of `cls` with `values` typed as the class declares them.

    None values are left out. Unknown property names are a programming error
    (KeyError here); values are typed when the properties are read or rendered.
    """
    inst = Instance.lazy(cls.classname)
    inst._shape, inst._src = split_values(cls, values)
    if path is not None:
        inst._pshape, inst._psrc = split_path(path)
        src = inst._src
        if len(inst._psrc) == len(src) and all(a is b for a, b in zip(inst._psrc, src)):
            inst._psrc = src      # keys are the values (associations): one tuple for both
    return inst


def reference_values(inst: CIMInstance) -> list[tuple[str, Any]]:
    """(name, value) of the non-NULL reference properties of any instance."""
    if isinstance(inst, Instance):
        return inst.reference_values()
    return [(p.name, p.value) for p in inst.properties.values()
            if p.type == "reference" and p.value is not None]
