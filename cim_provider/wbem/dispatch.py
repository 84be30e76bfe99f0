"""Operation dispatch: the generic CIM rules of DSP0200, applied once for every class.

The dispatcher validates parameters, resolves classes in the repository, fans
enumerations out to the providers of every subclass, walks associations, applies
PropertyList / DeepInheritance / LocalOnly / IncludeQualifiers / IncludeClassOrigin,
manages pull contexts and turns everything into CIM-XML fragments. Providers only
produce complete instances (see provider.py for the contract).
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import pywbem
from pywbem import (CIMClass, CIMClassName, CIMDateTime, CIMError, CIMInstance,
                    CIMInstanceName)

from . import wql
from . import writer as w
from .embedded import parse_embedded_instance
from .provider import AssociationProvider, Provider, Registry, path_key, rendered
from .pull import PullContexts
from .repository import Namespace, Repository
from .request import CIMRequest

log = logging.getLogger(__name__)

_REQUIRED = object()


@dataclass
class OperationContext:
    """Who is asking: filled in by the HTTP front (authentication arrives later)."""
    client: str = "local"
    user: str | None = None
    role: str = "operator"           # reader | operator


@dataclass
class Result:
    """What an operation produced: IRETURNVALUE content (None = no IRETURNVALUE)
    and extra output PARAMVALUEs (pull operations)."""
    body: list[str] | None
    params: list[str] | None = None


# --- parameter conversion -----------------------------------------------------

def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be a boolean")


def _as_uint32(name: str, v: Any) -> int:
    try:
        n = int(v.strip()) if isinstance(v, str) else int(v)
    except (TypeError, ValueError):
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be a uint32") from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} out of range for uint32")
    return n


def _as_str(name: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be a string")


def _as_strlist(name: str, v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be an array of strings")


def _as_classname(name: str, v: Any) -> str:
    if isinstance(v, CIMClassName):
        return v.classname
    if isinstance(v, str) and v:
        return v
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be a class name")


def _as_instancename(name: str, v: Any) -> CIMInstanceName:
    if isinstance(v, CIMInstanceName):
        return v
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be an instance name")


def _as_instance(name: str, v: Any) -> CIMInstance:
    if isinstance(v, CIMInstance):
        return v
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be an instance")


def _as_objectname(name: str, v: Any) -> CIMInstanceName | CIMClassName:
    if isinstance(v, (CIMInstanceName, CIMClassName)):
        return v
    if isinstance(v, str) and v:
        return CIMClassName(v)
    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{name} must be a class or instance name")


B, U32, S, SL, CN, IN, ON = _as_bool, _as_uint32, _as_str, _as_strlist, _as_classname, \
    _as_instancename, _as_objectname
INST = _as_instance

_PULL_OPEN = {"FilterQueryLanguage": (S, None), "FilterQuery": (S, None),
              "OperationTimeout": (U32, None), "ContinueOnError": (B, False),
              "MaxObjectCount": (U32, 0)}
_ASSOC = {"AssocClass": (CN, None), "ResultClass": (CN, None), "Role": (S, None),
          "ResultRole": (S, None)}
_REF = {"ResultClass": (CN, None), "Role": (S, None)}
_INST_OUT = {"IncludeQualifiers": (B, False), "IncludeClassOrigin": (B, False),
             "PropertyList": (SL, None)}

# DSP0200 intrinsic methods: parameter -> (converter, default). Defaults are DSP0200's.
SIGNATURES: dict[str, dict[str, tuple[Callable, Any]]] = {
    "GetClass": {"ClassName": (CN, _REQUIRED), "LocalOnly": (B, True),
                 "IncludeQualifiers": (B, True), "IncludeClassOrigin": (B, False),
                 "PropertyList": (SL, None)},
    "EnumerateClasses": {"ClassName": (CN, None), "DeepInheritance": (B, False),
                         "LocalOnly": (B, True), "IncludeQualifiers": (B, True),
                         "IncludeClassOrigin": (B, False)},
    "EnumerateClassNames": {"ClassName": (CN, None), "DeepInheritance": (B, False)},
    "GetQualifier": {"QualifierName": (S, _REQUIRED)},
    "EnumerateQualifiers": {},
    "GetInstance": {"InstanceName": (IN, _REQUIRED), "LocalOnly": (B, False), **_INST_OUT},
    "EnumerateInstances": {"ClassName": (CN, _REQUIRED), "LocalOnly": (B, False),
                           "DeepInheritance": (B, True), **_INST_OUT},
    "EnumerateInstanceNames": {"ClassName": (CN, _REQUIRED)},
    "Associators": {"ObjectName": (ON, _REQUIRED), **_ASSOC, **_INST_OUT},
    "AssociatorNames": {"ObjectName": (ON, _REQUIRED), **_ASSOC},
    "References": {"ObjectName": (ON, _REQUIRED), **_REF, **_INST_OUT},
    "ReferenceNames": {"ObjectName": (ON, _REQUIRED), **_REF},
    "OpenEnumerateInstances": {"ClassName": (CN, _REQUIRED), "DeepInheritance": (B, True),
                               "IncludeClassOrigin": (B, False), "PropertyList": (SL, None),
                               **_PULL_OPEN},
    "OpenEnumerateInstancePaths": {"ClassName": (CN, _REQUIRED), **_PULL_OPEN},
    "OpenAssociatorInstances": {"InstanceName": (IN, _REQUIRED), **_ASSOC,
                                "IncludeClassOrigin": (B, False), "PropertyList": (SL, None),
                                **_PULL_OPEN},
    "OpenAssociatorInstancePaths": {"InstanceName": (IN, _REQUIRED), **_ASSOC, **_PULL_OPEN},
    "OpenReferenceInstances": {"InstanceName": (IN, _REQUIRED), **_REF,
                               "IncludeClassOrigin": (B, False), "PropertyList": (SL, None),
                               **_PULL_OPEN},
    "OpenReferenceInstancePaths": {"InstanceName": (IN, _REQUIRED), **_REF, **_PULL_OPEN},
    "PullInstancesWithPath": {"EnumerationContext": (S, _REQUIRED),
                              "MaxObjectCount": (U32, _REQUIRED)},
    "PullInstancePaths": {"EnumerationContext": (S, _REQUIRED),
                          "MaxObjectCount": (U32, _REQUIRED)},
    "CloseEnumeration": {"EnumerationContext": (S, _REQUIRED)},
    "CreateInstance": {"NewInstance": (INST, _REQUIRED)},
    "ModifyInstance": {"ModifiedInstance": (INST, _REQUIRED), "IncludeQualifiers": (B, True),
                       "PropertyList": (SL, None)},
    "DeleteInstance": {"InstanceName": (IN, _REQUIRED)},
    "ExecQuery": {"QueryLanguage": (S, _REQUIRED), "Query": (S, _REQUIRED)},
    "OpenQueryInstances": {"FilterQuery": (S, _REQUIRED), "FilterQueryLanguage": (S, _REQUIRED),
                           "ReturnQueryResultClass": (B, False),
                           "OperationTimeout": (U32, None), "ContinueOnError": (B, False),
                           "MaxObjectCount": (U32, 0)},
    "PullInstances": {"EnumerationContext": (S, _REQUIRED), "MaxObjectCount": (U32, _REQUIRED)},
}
_SIG_BY_LOWER = {k.lower(): k for k in SIGNATURES}

# Operations a read-only server answers with CIM_ERR_NOT_SUPPORTED (DSP0200 allows it).
UNSUPPORTED = {n.lower() for n in (
    "CreateClass", "ModifyClass", "DeleteClass", "SetQualifier", "DeleteQualifier",
    "GetProperty", "SetProperty", "EnumerationCount")}


def _convert_params(op: str, sent: dict[str, Any]) -> dict[str, Any]:
    sig = SIGNATURES[op]
    lower = {k.lower(): k for k in sig}
    out: dict[str, Any] = {}
    for name, value in sent.items():
        canon = lower.get(name.lower())
        if canon is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"{op} has no parameter {name[:64]!r}")
        conv, default = sig[canon]
        # A NULL value (IPARAMVALUE without child) means "use the default".
        out[canon] = (None if default is _REQUIRED else default) if value is None \
            else conv(canon, value)
    for canon, (_conv, default) in sig.items():
        if canon not in out:
            if default is _REQUIRED:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"{op} requires parameter {canon}")
            out[canon] = default
        elif out[canon] is None and default is _REQUIRED:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{canon} must not be NULL")
    return out


_DEC_INT = re.compile(r"[+-]?[0-9]+")
_HEX_INT = re.compile(r"[+-]?0[xX][0-9a-fA-F]+")


def convert_value(value: Any, cimtype: str, is_array: bool, what: str) -> Any:
    """A method parameter or key value, as sent, converted to the declared CIM type."""
    if value is None:
        return None
    if is_array:
        if not isinstance(value, list):
            value = [value]
        return [convert_value(v, cimtype, False, what) for v in value]
    if isinstance(value, list):
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{what} must not be an array")
    try:
        if cimtype == "reference":
            if isinstance(value, CIMInstanceName):
                return value
            raise ValueError("not a reference")
        if cimtype == "string":
            if isinstance(value, (CIMInstance, CIMClass)):
                return value       # an embedded object given as such
            if isinstance(value, bool):
                raise ValueError("boolean given for a string")
            if isinstance(value, (CIMInstanceName, CIMClassName)):
                raise ValueError("reference given for a string")
            return value if isinstance(value, str) else str(value)
        if cimtype == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise ValueError("not a boolean")
        if cimtype == "datetime":
            return value if isinstance(value, CIMDateTime) else CIMDateTime(str(value))
        if cimtype == "char16":
            s = str(value)
            if len(s) != 1:
                raise ValueError("char16 needs one character")
            return pywbem.Char16(s)
        if cimtype in ("real32", "real64"):
            if isinstance(value, bool):
                raise ValueError("boolean given for a real")
            return pywbem.type_from_name(cimtype)(_real(value, cimtype))
        if isinstance(value, bool):
            raise ValueError("boolean given for an integer")
        if isinstance(value, str):
            # Decimal or 0x-hex only (DSP0201); pywbem's unpack_numeric would truncate
            # "1.5" to 1, so reals are refused for integer types here.
            text = value.strip()
            if _HEX_INT.fullmatch(text):
                value = int(text, 16)
            elif _DEC_INT.fullmatch(text):
                value = int(text)
            else:
                raise ValueError(f"{text[:32]!r} is not an integer")
        elif isinstance(value, float) and not value.is_integer():
            raise ValueError("a real number given for an integer")
        return pywbem.type_from_name(cimtype)(int(value))
    except CIMError:
        raise
    except Exception as exc:
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                       f"{what}: invalid {cimtype} value ({_short(exc)})") from None


_REAL32_MAX = 3.4028234663852886e38


def _real(value: Any, cimtype: str) -> float:
    """DSP0201 reals are IEEE 754 binary32/64: a number that does not fit is refused
    rather than silently becoming infinity (an explicit INF text is kept)."""
    f = float(value)
    if math.isinf(f) and isinstance(value, str) and "inf" not in value.lower():
        raise ValueError(f"out of range for {cimtype}")
    if cimtype == "real32" and math.isfinite(f) and abs(f) > _REAL32_MAX:
        raise ValueError("out of range for real32")
    return f


def _short(exc: object, limit: int = 200) -> str:
    s = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return s if len(s) <= limit else s[:limit] + "..."


class Dispatcher:
    """Runs one parsed request against the repository and the providers."""

    def __init__(self, repo: Repository, registry: Registry, host: str,
                 pulls: PullContexts | None = None):
        self.repo = repo
        self.registry = registry
        self.host = host
        self.pulls = pulls if pulls is not None else PullContexts()  # empty is falsy
        self._keys: dict[tuple[str, str], list] = {}

    # -- entry point ---------------------------------------------------------

    async def handle(self, req: CIMRequest, ctx: OperationContext) -> list[str]:
        """Response body pieces for a parsed request; CIM errors become ERROR."""
        try:
            if req.intrinsic:
                res = await self._intrinsic(req, ctx)
                inner = []
                if res.body is not None:
                    inner = ["<IRETURNVALUE>", *res.body, "</IRETURNVALUE>"]
                inner += res.params or []
            else:
                inner = await self._extrinsic(req, ctx)
        except CIMError as exc:
            log.info("%s in %s: %s %s", req.method, req.namespace, exc.status_code_name,
                     exc.status_description)
            inner = [w.error_xml(exc.status_code, exc.status_description or "")]
        except Exception:
            log.exception("internal error in %s", req.method)
            inner = [w.error_xml(pywbem.CIM_ERR_FAILED, "internal error; see the server log")]
        return [w.message_start(req.msg_id, req.intrinsic, req.method), *inner,
                w.message_end(req.intrinsic)]

    async def _intrinsic(self, req: CIMRequest, ctx: OperationContext) -> Result:
        lname = req.method.lower()
        op = _SIG_BY_LOWER.get(lname)
        if op is None:
            if lname in UNSUPPORTED:
                raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED, f"{req.method} is not supported")
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           f"unknown intrinsic method {req.method[:64]!r}")
        ns = self.repo.namespace(req.namespace)
        params = _convert_params(op, req.params)
        return await getattr(self, "op_" + op)(ns, params, ctx)

    # -- classes and qualifiers -----------------------------------------------

    def _class(self, ns: Namespace, name: str, missing: int = pywbem.CIM_ERR_INVALID_CLASS) -> CIMClass:
        cls = ns.get(name)
        if cls is None:
            raise CIMError(missing, f"class {name[:128]!r} does not exist in {ns.name}")
        return cls

    @staticmethod
    def _class_view(cls: CIMClass, local_only: bool, property_list: list[str] | None) -> CIMClass:
        if not local_only and property_list is None:
            return cls
        out = cls.copy()
        wanted = None if property_list is None else {p.lower() for p in property_list}
        for name in list(out.properties):
            p = out.properties[name]
            if (local_only and p.propagated) or (wanted is not None and name.lower() not in wanted):
                del out.properties[name]
        if local_only:
            for name in list(out.methods):
                if out.methods[name].propagated:
                    del out.methods[name]
        return out

    async def op_GetClass(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self._class(ns, p["ClassName"], pywbem.CIM_ERR_NOT_FOUND)
        view = self._class_view(cls, p["LocalOnly"], p["PropertyList"])
        return Result([w.class_xml(view, qualifiers=p["IncludeQualifiers"],
                                   class_origin=p["IncludeClassOrigin"])])

    def _class_names(self, ns: Namespace, p: dict) -> list[str]:
        if p["ClassName"] is not None:
            self._class(ns, p["ClassName"])
        return ns.subclasses(p["ClassName"], p["DeepInheritance"])

    async def op_EnumerateClasses(self, ns: Namespace, p: dict, ctx) -> Result:
        out = []
        for name in self._class_names(ns, p):
            view = self._class_view(ns.get(name), p["LocalOnly"], None)
            out.append(w.class_xml(view, qualifiers=p["IncludeQualifiers"],
                                   class_origin=p["IncludeClassOrigin"]))
        return Result(out)

    async def op_EnumerateClassNames(self, ns: Namespace, p: dict, ctx) -> Result:
        return Result([w.classname_xml(n) for n in self._class_names(ns, p)])

    async def op_GetQualifier(self, ns: Namespace, p: dict, ctx) -> Result:
        q = ns.qualifiers.get(p["QualifierName"].lower())
        if q is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                           f"qualifier {p['QualifierName'][:64]!r} is not declared")
        return Result([w.qualifier_declaration_xml(q)])

    async def op_EnumerateQualifiers(self, ns: Namespace, p: dict, ctx) -> Result:
        return Result([w.qualifier_declaration_xml(q) for q in ns.qualifiers.values()])

    # -- instances --------------------------------------------------------------

    def key_properties(self, ns: Namespace, cls: CIMClass) -> list:
        k = (ns.name, cls.classname.lower())
        keys = self._keys.get(k)
        if keys is None:
            keys = [p for p in cls.properties.values()
                    if p.qualifiers.get("Key") is not None and p.qualifiers["Key"].value]
            self._keys[k] = keys
        return keys

    def normalize_path(self, ns: Namespace, path: CIMInstanceName,
                       unknown_class: int = pywbem.CIM_ERR_INVALID_CLASS) -> CIMInstanceName:
        """The path with the class's exact key names and declared types, in `ns`.

        Missing, extra or unconvertible keys name no instance: CIM_ERR_NOT_FOUND.
        """
        if path.namespace and path.namespace.strip("/").lower() != ns.name.lower():
            ns = self.repo.namespace(path.namespace)
        cls = self._class(ns, path.classname, unknown_class)
        keys = self.key_properties(ns, cls)
        kbs = path.keybindings
        if path.classname == cls.classname and len(kbs) == len(keys) and all(
                p.type == "string" and type(kbs.get(p.name)) is str and p.name in kbs.keys()
                for p in keys):
            # Hot path (GetInstance of a path we handed out): names exact, all string
            # keys. The parsed path belongs to this request, so it is completed in place.
            path.namespace = ns.name
            path.host = None
            return path
        sent = {k.lower(): v for k, v in kbs.items()}
        if len(sent) != len(path.keybindings) or set(sent) != {p.name.lower() for p in keys}:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                           f"keys of {cls.classname} are "
                           f"{', '.join(p.name for p in keys)}; the path does not match")
        kb = {}
        for prop in keys:
            try:
                value = convert_value(sent[prop.name.lower()], prop.type, False, prop.name)
                if prop.type == "reference":
                    value = self.normalize_path(ns, value, pywbem.CIM_ERR_NOT_FOUND)
            except CIMError as exc:
                raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                               f"no instance with that key: {exc.status_description}") from None
            kb[prop.name] = value
        return CIMInstanceName(cls.classname, kb, namespace=ns.name)

    def _providers_for(self, ns: Namespace, classname: str) -> list[tuple[str, Provider]]:
        """(leaf class, provider) for every registered class at or under `classname`."""
        out = []
        for leaf in self.registry.classes(ns.name):
            if ns.is_subclass(leaf, classname):
                cls = ns.get(leaf)
                if cls is not None:
                    out.append((cls.classname, self.registry.provider(ns.name, leaf)))
        return out

    async def _enumerate(self, ns: Namespace, classname: str) -> list[CIMInstance]:
        out: list[CIMInstance] = []
        for leaf, prov in self._providers_for(ns, classname):
            out.extend(await prov.enumerate_instances(leaf))
        return out

    async def _enumerate_names(self, ns: Namespace, classname: str) -> list[CIMInstanceName]:
        out: list[CIMInstanceName] = []
        for leaf, prov in self._providers_for(ns, classname):
            out.extend(await prov.enumerate_instance_names(leaf))
        return out

    async def get_instance(self, path: CIMInstanceName, ns: Namespace | None = None) -> CIMInstance:
        """A normalized path -> the provider's instance (used by associations too)."""
        ns = ns or self.repo.namespace(path.namespace)
        prov = self.registry.provider(ns.name, path.classname)
        if prov is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no instance {path}")
        return await prov.get_instance(path)

    def _allowed(self, ns: Namespace, classname: str, deep: bool,
                 property_list: list[str] | None) -> set[str] | None:
        allowed = None if property_list is None else {p.lower() for p in property_list}
        if not deep:
            own = {n.lower() for n in ns.get(classname).properties}
            allowed = own if allowed is None else allowed & own
        return allowed

    def _view(self, ns: Namespace, inst: CIMInstance, allowed: set[str] | None,
              class_origin: bool) -> CIMInstance:
        """The instance as the client asked for it; the provider's object if unchanged."""
        if allowed is None and not class_origin:
            return inst
        props = {}
        cls = ns.get(inst.classname) if class_origin else None
        for name, prop in inst.properties.items():
            if allowed is not None and name.lower() not in allowed:
                continue
            if cls is not None and name in cls.properties:
                prop = prop.copy()
                prop.class_origin = cls.properties[name].class_origin
                prop.propagated = cls.properties[name].propagated
            props[name] = prop
        return CIMInstance(inst.classname, properties=props, path=inst.path)

    async def op_GetInstance(self, ns: Namespace, p: dict, ctx) -> Result:
        path = self.normalize_path(ns, p["InstanceName"])
        inst = await self.get_instance(path, ns)
        view = self._view(ns, inst, self._allowed(ns, inst.classname, True, p["PropertyList"]),
                          p["IncludeClassOrigin"])
        if view is inst:
            return Result([self._body(inst)])
        return Result([w.instance_xml(view, class_origin=p["IncludeClassOrigin"])])

    async def op_EnumerateInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self._class(ns, p["ClassName"])
        allowed = self._allowed(ns, cls.classname, p["DeepInheritance"], p["PropertyList"])
        co = p["IncludeClassOrigin"]
        out = []
        for inst in await self._enumerate(ns, cls.classname):
            view = self._view(ns, inst, allowed, co)
            if view is inst:
                out.append(w.value_namedinstance_xml(inst, self._body(inst), rendered(
                    inst, "name", lambda: w.instancename_xml(inst.path))))
            else:
                out.append(w.value_namedinstance_xml(inst, w.instance_xml(view, class_origin=co)))
        return Result(out)

    async def op_EnumerateInstanceNames(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self._class(ns, p["ClassName"])
        return Result([w.instancename_xml(path)
                       for path in await self._enumerate_names(ns, cls.classname)])

    # -- associations ---------------------------------------------------------------

    def _assoc_classes(self, ns: Namespace, filter_class: str | None) -> list[tuple[str, AssociationProvider]]:
        if filter_class is not None and ns.get(filter_class) is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"class {filter_class[:128]!r} does not exist in {ns.name}")
        out = []
        for leaf in self.registry.classes(ns.name):
            prov = self.registry.provider(ns.name, leaf)
            if isinstance(prov, AssociationProvider) and (
                    filter_class is None or ns.is_subclass(leaf, filter_class)):
                out.append((ns.get(leaf).classname, prov))
        return out

    async def _references(self, ns: Namespace, source: CIMInstanceName,
                          result_class: str | None, role: str | None) -> list[tuple[CIMInstance, str]]:
        """(association instance, name of the reference that names `source`)."""
        key = path_key(source)
        out = []
        for leaf, prov in self._assoc_classes(ns, result_class):
            for inst in await prov.references(leaf, source):
                for prop in inst.properties.values():
                    if prop.type != "reference" or prop.value is None:
                        continue
                    if role is not None and prop.name.lower() != role.lower():
                        continue
                    if path_key(prop.value, ns.name) == key:
                        out.append((inst, prop.name))
                        break
        return out

    async def _associator_paths(self, ns: Namespace, source: CIMInstanceName, p: dict) -> list[CIMInstanceName]:
        # Associated objects may live in another namespace (ElementConformsToProfile
        # links root/virt and interop): ResultClass must exist in some served namespace.
        rc = p["ResultClass"]
        if rc is not None and not any(self.repo.namespace(n).get(rc) is not None
                                      for n in self.repo.namespace_names):
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"class {rc[:128]!r} does not exist in any namespace")
        seen: dict[tuple, CIMInstanceName] = {}
        for assoc, via in await self._references(ns, source, p["AssocClass"], p["Role"]):
            for prop in assoc.properties.values():
                if prop.type != "reference" or prop.value is None or prop.name == via:
                    continue
                if p["ResultRole"] is not None and prop.name.lower() != p["ResultRole"].lower():
                    continue
                target = prop.value
                tns = self.repo.namespace(target.namespace or ns.name)
                if p["ResultClass"] is not None and not tns.is_subclass(target.classname, p["ResultClass"]):
                    continue
                seen.setdefault(path_key(target, ns.name), target)
        return list(seen.values())

    def _source(self, ns: Namespace, obj: CIMInstanceName | CIMClassName) -> CIMInstanceName:
        if isinstance(obj, CIMClassName):
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           "association operations on classes are not supported")
        path = self.normalize_path(ns, obj, pywbem.CIM_ERR_INVALID_PARAMETER)
        return path

    async def _associators(self, ns: Namespace, obj, p: dict) -> list[CIMInstance]:
        source = self._source(ns, obj)
        await self.get_instance(source)      # CIM_ERR_NOT_FOUND for a missing source
        out = []
        for target in await self._associator_paths(ns, source, p):
            try:
                out.append(await self.get_instance(target))
            except CIMError as exc:
                if exc.status_code != pywbem.CIM_ERR_NOT_FOUND:
                    raise
                log.debug("associated instance %s vanished", target)
        return out

    async def op_Associators(self, ns: Namespace, p: dict, ctx) -> Result:
        co = p["IncludeClassOrigin"]
        out = []
        for inst in await self._associators(ns, p["ObjectName"], p):
            view = self._view(self.repo.namespace(inst.path.namespace), inst,
                              self._allowed(ns, inst.classname, True, p["PropertyList"]), co)
            out.append(self._with_path(inst, view, co, w.value_objectwithpath_xml))
        return Result(out)

    async def op_AssociatorNames(self, ns: Namespace, p: dict, ctx) -> Result:
        source = self._source(ns, p["ObjectName"])
        await self.get_instance(source)
        return Result([w.objectpath_xml(t, self.host)
                       for t in await self._associator_paths(ns, source, p)])

    async def _reference_instances(self, ns: Namespace, obj, p: dict) -> list[CIMInstance]:
        source = self._source(ns, obj)
        await self.get_instance(source)
        return [a for a, _via in await self._references(ns, source, p["ResultClass"], p["Role"])]

    async def op_References(self, ns: Namespace, p: dict, ctx) -> Result:
        co = p["IncludeClassOrigin"]
        out = []
        for inst in await self._reference_instances(ns, p["ObjectName"], p):
            view = self._view(ns, inst, self._allowed(ns, inst.classname, True, p["PropertyList"]), co)
            out.append(self._with_path(inst, view, co, w.value_objectwithpath_xml))
        return Result(out)

    async def op_ReferenceNames(self, ns: Namespace, p: dict, ctx) -> Result:
        return Result([w.objectpath_xml(a.path, self.host)
                       for a in await self._reference_instances(ns, p["ObjectName"], p)])

    # -- pull operations --------------------------------------------------------------

    def _check_open(self, p: dict) -> float | None:
        if p["FilterQueryLanguage"] is not None or p["FilterQuery"] is not None:
            raise CIMError(pywbem.CIM_ERR_FILTERED_ENUMERATION_NOT_SUPPORTED,
                           "filtered enumerations are not supported")
        if p["ContinueOnError"]:
            raise CIMError(pywbem.CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED,
                           "ContinueOnError is not supported")
        return self.pulls.check_timeout(p["OperationTimeout"])

    def _open(self, ns: Namespace, p: dict, ctx: OperationContext, kind: str,
              items: list[str]) -> Result:
        timeout = self._check_open(p)
        ctx_id, chunk, eos = self.pulls.open(ns.name, kind, items, p["MaxObjectCount"],
                                             timeout, ctx.client)
        return self._pull_result(chunk, eos, ctx_id)

    @staticmethod
    def _pull_result(chunk: list[str], eos: bool, ctx_id: str | None) -> Result:
        params = [w.paramvalue_xml("EndOfSequence", eos, "boolean")]
        if not eos:
            params.append(w.paramvalue_xml("EnumerationContext", ctx_id, "string"))
        return Result(chunk, params)

    def _iwp(self, ns: Namespace, insts: Iterable[CIMInstance], p: dict, deep: bool,
             classname: str | None) -> list[str]:
        co = p["IncludeClassOrigin"]
        out = []
        for inst in insts:
            allowed = self._allowed(ns, classname or inst.classname, deep, p["PropertyList"])
            view = self._view(self.repo.namespace(inst.path.namespace or ns.name), inst, allowed, co)
            out.append(self._with_path(inst, view, co, w.value_instancewithpath_xml))
        return out

    @staticmethod
    def _body(inst: CIMInstance) -> str:
        """INSTANCE of an unfiltered instance, rendered once per instance."""
        return rendered(inst, "instance", lambda: w.instance_xml(inst))

    def _with_path(self, inst: CIMInstance, view: CIMInstance, co: bool, wrap) -> str:
        """An instance with its full path; its pieces cached on it when unfiltered.
        Only the pieces are kept (not each wrapper), which keeps memory per instance
        near the size of its CIM-XML."""
        path = rendered(inst, f"path@{self.host}", lambda: w.instancepath_xml(inst.path, self.host))
        if view is inst:
            return wrap(inst, self._body(inst), self.host, path)
        return wrap(inst, w.instance_xml(view, class_origin=co), self.host, path)

    async def op_OpenEnumerateInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        cls = self._class(ns, p["ClassName"])
        items = self._iwp(ns, await self._enumerate(ns, cls.classname), p,
                          p["DeepInheritance"], cls.classname)
        return self._open(ns, p, ctx, "instances", items)

    async def op_OpenEnumerateInstancePaths(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        cls = self._class(ns, p["ClassName"])
        items = [w.instancepath_xml(path, self.host)
                 for path in await self._enumerate_names(ns, cls.classname)]
        return self._open(ns, p, ctx, "paths", items)

    async def op_OpenAssociatorInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        items = self._iwp(ns, await self._associators(ns, p["InstanceName"], p), p, True, None)
        return self._open(ns, p, ctx, "instances", items)

    async def op_OpenAssociatorInstancePaths(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        source = self._source(ns, p["InstanceName"])
        await self.get_instance(source)
        items = [w.instancepath_xml(t, self.host)
                 for t in await self._associator_paths(ns, source, p)]
        return self._open(ns, p, ctx, "paths", items)

    async def op_OpenReferenceInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        items = self._iwp(ns, await self._reference_instances(ns, p["InstanceName"], p), p,
                          True, None)
        return self._open(ns, p, ctx, "instances", items)

    async def op_OpenReferenceInstancePaths(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        items = [w.instancepath_xml(a.path, self.host)
                 for a in await self._reference_instances(ns, p["InstanceName"], p)]
        return self._open(ns, p, ctx, "paths", items)

    async def op_PullInstancesWithPath(self, ns: Namespace, p: dict, ctx) -> Result:
        chunk, eos, ctx_id = self.pulls.pull(ns.name, "instances", p["EnumerationContext"],
                                             p["MaxObjectCount"], ctx.client)
        return self._pull_result(chunk, eos, ctx_id)

    async def op_PullInstancePaths(self, ns: Namespace, p: dict, ctx) -> Result:
        chunk, eos, ctx_id = self.pulls.pull(ns.name, "paths", p["EnumerationContext"],
                                             p["MaxObjectCount"], ctx.client)
        return self._pull_result(chunk, eos, ctx_id)

    async def op_CloseEnumeration(self, ns: Namespace, p: dict, ctx) -> Result:
        self.pulls.close(ns.name, p["EnumerationContext"], ctx.client)
        return Result(None)

    # -- instance writes ----------------------------------------------------------------

    @staticmethod
    def _require_operator(ctx: OperationContext, what: str) -> None:
        if ctx.role != "operator":
            raise CIMError(pywbem.CIM_ERR_ACCESS_DENIED,
                           f"user {ctx.user!r} may not {what} (role {ctx.role})")

    def _typed_instance(self, ns: Namespace, cls: CIMClass, inst: CIMInstance,
                        path: CIMInstanceName | None) -> CIMInstance:
        """`inst` with the class's exact names and declared types; unknown properties and
        bad values are CIM_ERR_INVALID_PARAMETER (DSP0200 CreateInstance/ModifyInstance)."""
        props = {}
        for name, prop in inst.properties.items():
            decl = cls.properties.get(name)
            if decl is None:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"{cls.classname} has no property {name[:64]!r}")
            value = convert_value(prop.value, decl.type, decl.is_array, decl.name)
            if decl.type == "reference" and value is not None:
                try:
                    value = self.normalize_path(ns, value, pywbem.CIM_ERR_INVALID_PARAMETER)
                except CIMError as exc:
                    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                                   f"{decl.name}: {exc.status_description}") from None
            props[decl.name] = pywbem.CIMProperty(
                decl.name, value, type=decl.type, reference_class=decl.reference_class,
                embedded_object=decl.embedded_object, is_array=decl.is_array)
        return CIMInstance(cls.classname, properties=props, path=path)

    def _writer(self, ns: Namespace, classname: str) -> Provider:
        prov = self.registry.provider(ns.name, classname)
        if prov is None:     # DESIGN.md: writes to read-only classes are not supported
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           f"instances of {classname} are read-only")
        return prov

    async def op_CreateInstance(self, ns: Namespace, p: dict, ctx) -> Result:
        # DSP0200 CreateInstance: NewInstance in, the new instance's INSTANCENAME out;
        # the path of NewInstance, if any, is ignored.
        self._require_operator(ctx, "create instances")
        cls = self._class(ns, p["NewInstance"].classname)
        prov = self._writer(ns, cls.classname)
        inst = self._typed_instance(ns, cls, p["NewInstance"], None)
        path = await prov.create_instance(inst, ctx)
        return Result([w.instancename_xml(path)])

    async def op_ModifyInstance(self, ns: Namespace, p: dict, ctx) -> Result:
        self._require_operator(ctx, "modify instances")
        inst = p["ModifiedInstance"]
        if inst.path is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "ModifiedInstance has no path")
        path = self.normalize_path(ns, inst.path)
        cls = self._class(ns, path.classname)
        prov = self._writer(ns, cls.classname)
        await prov.modify_instance(self._typed_instance(ns, cls, inst, path), p["PropertyList"],
                                   ctx)
        return Result(None)

    async def op_DeleteInstance(self, ns: Namespace, p: dict, ctx) -> Result:
        self._require_operator(ctx, "delete instances")
        path = self.normalize_path(ns, p["InstanceName"])
        await self._writer(ns, path.classname).delete_instance(path, ctx)
        return Result(None)

    # -- queries ---------------------------------------------------------------------------

    def _query(self, ns: Namespace, language: str, text: str) -> tuple[wql.Query, CIMClass]:
        """Parse and check a query against the namespace's classes.

        DSP0200 ExecQuery: CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED when the language is not
        recognized, CIM_ERR_INVALID_QUERY when the query is not valid in it (we also use
        it for the WQL features we do not offer, and for unknown classes or properties)."""
        if language.strip().upper() != wql.LANGUAGE:
            raise CIMError(pywbem.CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED,
                           f"query language {language[:64]!r} is not supported; use WQL")
        try:
            query = wql.parse(text)
        except wql.WQLError as exc:
            raise CIMError(pywbem.CIM_ERR_INVALID_QUERY, exc.message) from None
        cls = ns.get(query.classname)
        if cls is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_QUERY,
                           f"class {query.classname[:128]!r} does not exist in {ns.name}")
        for name in list(query.select or ()) + [pr.path[0] for pr in query.props()]:
            if name not in cls.properties:
                raise CIMError(pywbem.CIM_ERR_INVALID_QUERY,
                               f"{cls.classname} has no property {name[:64]!r}")
        for name in query.isa_classes():
            if ns.get(name) is None:
                raise CIMError(pywbem.CIM_ERR_INVALID_QUERY,
                               f"class {name[:128]!r} does not exist in {ns.name}")
        return query, cls

    async def _query_instances(self, ns: Namespace, query: wql.Query,
                               cls: CIMClass) -> list[CIMInstance]:
        allowed = None if query.select is None else {n.lower() for n in query.select}
        return [self._view(ns, inst, allowed, False)
                for inst in await self._enumerate(ns, cls.classname)
                if wql.matches(query, inst, ns.is_subclass)]

    async def op_ExecQuery(self, ns: Namespace, p: dict, ctx) -> Result:
        query, cls = self._query(ns, p["QueryLanguage"], p["Query"])
        return Result([w.value_objectwithpath_xml(inst, None, self.host)
                       for inst in await self._query_instances(ns, query, cls)])

    async def op_OpenQueryInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        # DSP0200 OpenQueryInstances: the result is pulled with PullInstances, which
        # returns INSTANCE elements without paths.
        if p["ContinueOnError"]:
            raise CIMError(pywbem.CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED,
                           "ContinueOnError is not supported")
        timeout = self.pulls.check_timeout(p["OperationTimeout"])
        query, cls = self._query(ns, p["FilterQueryLanguage"], p["FilterQuery"])
        items = [w.instance_xml(inst) for inst in await self._query_instances(ns, query, cls)]
        ctx_id, chunk, eos = self.pulls.open(ns.name, "query", items, p["MaxObjectCount"],
                                             timeout, ctx.client)
        res = self._pull_result(chunk, eos, ctx_id)
        if p["ReturnQueryResultClass"]:
            view = self._class_view(cls, False, None if query.select is None
                                    else list(query.select))
            res.params.insert(0, w.paramvalue_class_xml("QueryResultClass", view))
        return res

    async def op_PullInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        chunk, eos, ctx_id = self.pulls.pull(ns.name, "query", p["EnumerationContext"],
                                             p["MaxObjectCount"], ctx.client)
        return self._pull_result(chunk, eos, ctx_id)

    # -- extrinsic methods -------------------------------------------------------------

    async def _extrinsic(self, req: CIMRequest, ctx: OperationContext) -> list[str]:
        if ctx.role != "operator":
            raise CIMError(pywbem.CIM_ERR_ACCESS_DENIED,
                           f"user {ctx.user!r} may not invoke methods (role {ctx.role})")
        ns = self.repo.namespace(req.namespace)
        target = req.target
        if isinstance(target, CIMInstanceName):
            cls = self._class(ns, target.classname, pywbem.CIM_ERR_INVALID_CLASS)
            target = self.normalize_path(ns, target)
            await self.get_instance(target, ns)
        else:
            cls = self._class(ns, target.classname, pywbem.CIM_ERR_INVALID_CLASS)
            target = CIMClassName(cls.classname, namespace=ns.name)
        method = next((m for n, m in cls.methods.items() if n.lower() == req.method.lower()), None)
        if method is None:
            raise CIMError(pywbem.CIM_ERR_METHOD_NOT_FOUND,
                           f"{cls.classname} has no method {req.method[:64]!r}")
        decls = {n.lower(): prm for n, prm in method.parameters.items()}
        params: dict[str, Any] = {}
        for name, (_ptype, value) in req.params.items():
            decl = decls.get(name.lower())
            if decl is None or not _is_input(decl):
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"{method.name} has no input parameter {name[:64]!r}")
            if decl.name in params:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{decl.name} given twice")
            value = convert_value(value, decl.type, decl.is_array, decl.name)
            if decl.type == "reference" and value is not None:
                value = [self._param_path(ns, v, decl.name) for v in value] \
                    if decl.is_array else self._param_path(ns, value, decl.name)
            elif decl.qualifiers.get("EmbeddedInstance") is not None and value is not None:
                value = [await self._embedded(ns, decl, v, f"{decl.name}[{i}]")
                         for i, v in enumerate(value)] if decl.is_array \
                    else await self._embedded(ns, decl, value, decl.name)
            params[decl.name] = value
        prov = self.registry.provider(ns.name, cls.classname)
        if prov is None:
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           f"{cls.classname}.{method.name} is not implemented")
        rv, out = await prov.invoke_method(target, method.name, params)
        pieces = [w.returnvalue_xml(rv, method.return_type)]
        for name, value in (out or {}).items():
            decl = decls.get(name.lower())
            pieces.append(w.paramvalue_xml(decl.name if decl else name, value,
                                           decl.type if decl else None))
        return pieces


    def _param_path(self, ns: Namespace, path: CIMInstanceName, what: str) -> CIMInstanceName:
        """A reference parameter, normalized like any path (key names and types).
        A namespace this server does not have is taken as the method's own: wbemcli
        sends `root/virt:Class.k="v"` as host "root", namespace "virt"."""
        path = path.copy()
        if path.namespace:
            try:
                self.repo.namespace(path.namespace)
            except CIMError:
                path.namespace = ns.name
        return self.normalize_path(ns, path, pywbem.CIM_ERR_INVALID_PARAMETER)

    async def _embedded(self, ns: Namespace, decl, value: Any, what: str) -> CIMInstance:
        """An EmbeddedInstance parameter (CIM-XML or MOF text) -> a CIMInstance of the
        declared class or a subclass, typed like CreateInstance's NewInstance.
        MOF is compiled off the event loop: it is CPU work proportional to its size."""
        try:
            if isinstance(value, str) and not value.lstrip().startswith("<"):
                loop = asyncio.get_running_loop()
                inst = await loop.run_in_executor(None, parse_embedded_instance, value, ns)
            else:
                inst = parse_embedded_instance(value, ns)
        except ValueError as exc:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{what}: {exc}") from None
        base = decl.qualifiers["EmbeddedInstance"].value
        cls = ns.get(inst.classname)
        if cls is None or (base and not ns.is_subclass(cls.classname, base)):
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"{what}: an instance of {inst.classname!r} is not a {base}")
        try:
            return self._typed_instance(ns, cls, inst, None)
        except CIMError as exc:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"{what}: {exc.status_description}") from None


def _is_input(decl) -> bool:
    q = decl.qualifiers
    if q.get("In") is not None:
        return bool(q["In"].value)
    return True     # In defaults to true in the CIM meta-model
