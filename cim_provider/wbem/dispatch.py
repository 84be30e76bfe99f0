"""Operation dispatch: the generic CIM rules of DSP0200, applied once for every class.

The dispatcher resolves classes in the repository, fans enumerations out to the
providers of every subclass, walks associations, manages pull contexts and turns
everything into CIM-XML (UTF-8 pieces that render.py keeps: an unchanged instance is
rendered once, an unchanged enumeration once per request shape). Parameters are in
params.py, the PropertyList/LocalOnly/ClassOrigin views in views.py and render.py,
extrinsic methods in methods.py, queries in queries.py. Providers only produce
complete instances (see provider.py for the contract).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable
from typing import Any, Callable

import pywbem
from pywbem import CIMClass, CIMClassName, CIMError, CIMInstance, CIMInstanceName

from . import pullops, queries, writes
from . import writer as w
from .audit import AuditHook, report
from .context import OperationContext, Pieces, Result
from .methods import invoke_method
from .params import SIGNATURES, UNSUPPORTED, Signature, convert_params, convert_value
from .provider import (AssociationProvider, Provider, Registry, object_key, path_key,
                       reference_values)
from .pull import PullContexts
from .render import (OWP, Named, Pacer, PathKeys, Paths, Renders, Views, encode, name_item,
                     named_instance, namespace_of, pieces_of, put, with_path)
from .repository import Namespace, Repository
from .request import CIMRequest
from .views import class_view

log = logging.getLogger(__name__)

__all__ = ["Dispatcher", "OperationContext", "Result", "OPERATIONS"]


class Dispatcher:
    """Runs one parsed request against the repository and the providers."""

    def __init__(self, repo: Repository, registry: Registry, host: str,
                 pulls: PullContexts | None = None, audit: AuditHook | None = None):
        self.repo = repo
        self.audit = audit           # called with each modifying operation's AuditRecord
        self.registry = registry
        self.host = host
        self.pulls = pulls if pulls is not None else PullContexts()  # empty is falsy
        self._keys: dict[tuple[str, str], list] = {}
        self.views = Views()             # request shapes, resolved once
        self.renders = Renders()         # rendered enumerations, while unchanged
        self.pages = pullops.Pages()     # rendered pages of pull operations
        self.paths = Paths()             # NAMESPACEPATH per host and namespace
        self._leaves: dict[tuple[str, str], tuple[int, list]] = {}
        self._plans: dict[tuple, _GetPlan] = {}   # GetInstance shape -> plan (quick_get)
        self.quick_answers = 0                    # GetInstances a kept plan answered

    # -- entry point ---------------------------------------------------------

    async def respond(self, req: CIMRequest, ctx: OperationContext) -> Pieces:
        """The response body (UTF-8 pieces) for a parsed request; CIM errors become
        ERROR; writes audited."""
        inner = Pieces()
        try:
            if req.duplicate is not None:
                # DSP0200: each parameter at most once; names are case-insensitive
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"parameter {req.duplicate[:64]!r} given twice")
            if req.intrinsic:
                res = await self._intrinsic(req, ctx)
                if res.body is not None:
                    put(inner, [b"<IRETURNVALUE>"])
                    put(inner, res.body)
                    put(inner, [b"</IRETURNVALUE>"])
                put(inner, res.params or [])
            else:
                put(inner, await invoke_method(self, req, ctx))
        except CIMError as exc:
            log.info("%s in %s: %s %s", req.method, req.namespace, exc.status_code_name,
                     exc.status_description)
            inner = put(Pieces(), [w.error_xml(exc.status_code, exc.status_description or "")])
            ctx.outcome = exc
        except Exception:
            if ctx.direct:
                raise
            log.exception("internal error in %s", req.method)
            inner = put(Pieces(), [w.error_xml(pywbem.CIM_ERR_FAILED,
                                               "internal error; see the server log")])
            ctx.outcome = CIMError(pywbem.CIM_ERR_FAILED)
        report(self.audit, req, ctx, self.repo)
        out = put(Pieces(), [w.message_start(req.msg_id, req.intrinsic, req.method)])
        out.extend(inner)
        out.add(_END[req.intrinsic])
        return out

    async def handle(self, req: CIMRequest, ctx: OperationContext) -> list[str]:
        """`respond` as text (in-process callers and tests)."""
        return [p.decode("utf-8") for p in (await self.respond(req, ctx)).pieces]

    async def _intrinsic(self, req: CIMRequest, ctx: OperationContext) -> Result:
        lname = req.method.lower()
        row = _OPERATIONS_BY_LOWER.get(lname)
        if row is None:
            if lname in UNSUPPORTED:
                raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED, f"{req.method} is not supported")
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           f"unknown intrinsic method {req.method[:64]!r}")
        op, (signature, handler) = row
        ns = self.repo.namespace(req.namespace)
        params = convert_params(op, req.params, signature)
        return await handler(self, ns, params, ctx)

    # -- classes and qualifiers -----------------------------------------------

    def get_class(self, ns: Namespace, name: str, missing: int = pywbem.CIM_ERR_INVALID_CLASS) -> CIMClass:
        cls = ns.get(name)
        if cls is None:
            raise CIMError(missing, f"class {name[:128]!r} does not exist in {ns.name}")
        return cls

    async def op_GetClass(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self.get_class(ns, p["ClassName"], pywbem.CIM_ERR_NOT_FOUND)
        view = class_view(cls, p["LocalOnly"], p["PropertyList"])
        return Result([w.class_xml(view, qualifiers=p["IncludeQualifiers"],
                                   class_origin=p["IncludeClassOrigin"])])

    def _class_names(self, ns: Namespace, p: dict) -> list[str]:
        if p["ClassName"] is not None:
            self.get_class(ns, p["ClassName"])
        return ns.subclasses(p["ClassName"], p["DeepInheritance"])

    async def op_EnumerateClasses(self, ns: Namespace, p: dict, ctx) -> Result:
        out = []
        for name in self._class_names(ns, p):
            view = class_view(ns.get(name), p["LocalOnly"], None)
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
        cls = self.get_class(ns, path.classname, unknown_class)
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
        """(leaf class, provider) for every registered class at or under `classname`
        (kept until a provider is registered)."""
        key = (ns.name, classname.lower())
        hit = self._leaves.get(key)
        if hit is not None and hit[0] == self.registry.generation:
            return hit[1]
        out: list[tuple[str, Provider]] = []
        for leaf in self.registry.classes(ns.name):
            if ns.is_subclass(leaf, classname):
                cls, prov = ns.get(leaf), self.registry.provider(ns.name, leaf)
                if cls is not None and prov is not None:   # prov: leaf is registered
                    out.append((cls.classname, prov))
        if len(self._leaves) > 1024:
            self._leaves.clear()
        self._leaves[key] = (self.registry.generation, out)
        return out

    async def _enumerate(self, ns: Namespace, classname: str) -> list[CIMInstance]:
        out: list[CIMInstance] = []
        for leaf, prov in self._providers_for(ns, classname):
            out.extend(await prov.enumerate_instances(leaf))
        return out

    async def _names(self, ns: Namespace, classname: str) -> Pieces:
        """INSTANCENAME of each instance (EnumerateInstanceNames). A provider that does
        not override enumerate_instance_names (which then lists its instances' paths)
        gives its instances, whose names are kept rendered."""
        out = Pieces()
        for leaf, prov in self._providers_for(ns, classname):
            key: tuple | None = ("names", ns.name, leaf, self.host)
            if type(prov).enumerate_instance_names is Provider.enumerate_instance_names:
                insts: Iterable = await prov.enumerate_instances(leaf)
            else:
                insts, key = [Named(path) for path in
                              await prov.enumerate_instance_names(leaf)], None
            out.extend(await self.renders.flat(key, insts, name_item))
        return out

    async def get_instance(self, path: CIMInstanceName, ns: Namespace | None = None) -> CIMInstance:
        """A normalized path -> the provider's instance (used by associations too)."""
        ns = ns or self.repo.namespace(path.namespace)
        prov = self.registry.provider(ns.name, path.classname)
        if prov is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no instance {path}")
        return await prov.get_instance(path)

    async def op_GetInstance(self, ns: Namespace, p: dict, ctx) -> Result:
        sent = p["InstanceName"]
        names = tuple(sent.keybindings) if ctx.quick is not None else ()
        path = self.normalize_path(ns, sent)
        inst = await self.get_instance(path, ns)
        view = self.views.get(ns, inst.classname, True, p["PropertyList"],
                              p["IncludeClassOrigin"])
        out = Pieces()
        out.add(view.body(inst))
        if ctx.quick is not None:            # answered: the next of this shape may be quick
            self._keep_plan(ctx.quick, ns, path, names, inst, view)
        return Result(out)

    # -- GetInstance from a kept plan (the HTTP fast lane) -----------------------------

    def _keep_plan(self, shape: tuple, ns: Namespace, path: CIMInstanceName,
                   names: tuple[str, ...], inst: CIMInstance, view: Any) -> None:
        """After an ordinary GetInstance of a QuickGet's shape: keep what it resolved
        (namespace, class, provider, view) when the next one with this shape can skip
        all of it. Only when normalize_path kept the path as it was sent (the key
        names exactly the class's, every value a string) and the provider answers by
        key values: then the resolution depends on nothing but the shape."""
        prov = self.registry.provider(ns.name, path.classname)
        if prov is None or type(prov).instance_by_keys is Provider.instance_by_keys \
                or inst.classname != path.classname:
            return
        kb = path.keybindings
        keys = [p.name for p in self.key_properties(ns, ns.get(path.classname))]
        if tuple(kb.keys()) != names or sorted(names) != sorted(keys) \
                or not all(type(kb[k]) is str for k in names):
            return
        if len(self._plans) >= 256:
            self._plans.clear()
        self._plans[shape] = _GetPlan(self.repo, self.registry.generation, prov,
                                      path.classname, names, view)

    def quick_get(self, q: Any) -> Pieces | None:
        """The response to a QuickGet (request.py) from its shape's kept plan; None when
        there is no plan, it is stale, or the keys name no instance (the ordinary way
        then answers, with its error). No await: the fast lane answers it at once."""
        plan = self._plans.get(q.shape)
        if plan is None or plan.repo is not self.repo \
                or plan.generation != self.registry.generation:
            return None
        inst = plan.provider.instance_by_keys(plan.classname, dict(zip(plan.names, q.keys)))
        if inst is None:
            return None
        self.quick_answers += 1
        out = Pieces()
        out.add(encode(w.message_start(q.msg_id, True, q.method)))
        out.add(b"<IRETURNVALUE>")
        out.add(plan.view.body(inst))
        out.add(b"</IRETURNVALUE>")
        out.add(_END[True])
        return out

    async def op_EnumerateInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self.get_class(ns, p["ClassName"])
        view = self.views.get(ns, cls.classname, p["DeepInheritance"], p["PropertyList"],
                              p["IncludeClassOrigin"])
        render = named_instance(view)
        out = Pieces()
        for leaf, prov in self._providers_for(ns, cls.classname):
            insts = await prov.enumerate_instances(leaf)
            out.extend(await self.renders.flat(("ei", ns.name, leaf, view), insts, render))
        return Result(out)

    async def op_EnumerateInstanceNames(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self.get_class(ns, p["ClassName"])
        return Result(await self._names(ns, cls.classname))

    # -- associations ---------------------------------------------------------------

    def _assoc_classes(self, ns: Namespace,
                       filter_class: str | None) -> list[tuple[str, AssociationProvider]]:
        if filter_class is not None and ns.get(filter_class) is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"class {filter_class[:128]!r} does not exist in {ns.name}")
        out = []
        for leaf in self.registry.classes(ns.name):
            prov, cls = self.registry.provider(ns.name, leaf), ns.get(leaf)
            if isinstance(prov, AssociationProvider) and cls is not None and (
                    filter_class is None or ns.is_subclass(leaf, filter_class)):
                out.append((cls.classname, prov))
        return out

    async def _references(self, ns: Namespace, source: CIMInstanceName,
                          result_class: str | None, role: str | None) -> list[tuple[CIMInstance, str]]:
        """(association instance, name of the reference that names `source`)."""
        out = []
        for leaf, prov in self._assoc_classes(ns, result_class):
            out += await self._leaf_references(ns, leaf, prov, source, role)
        return out

    async def _leaf_references(self, ns: Namespace, leaf: str, prov: AssociationProvider,
                               source: CIMInstanceName,
                               role: str | None) -> list[tuple[CIMInstance, str]]:
        key = path_key(source)
        keys = PathKeys(ns.name)
        out = []
        pace = Pacer()
        for inst in await prov.references(leaf, source):
            for name, value in reference_values(inst):
                if role is not None and name.lower() != role.lower():
                    continue
                if keys.of(value) == key:
                    out.append((inst, name))
                    break
            await pace.tick()
        return out

    async def _associated(self, ns: Namespace, source: CIMInstanceName,
                          p: dict) -> list[CIMInstanceName | CIMInstance]:
        """Each object associated with `source` once: a path, or the instance itself
        where the association's provider names it directly (`associated`)."""
        # Associated objects may live in another namespace (ElementConformsToProfile
        # links root/virt and interop): ResultClass must exist in some served namespace.
        rc, role, rrole = p["ResultClass"], p["Role"], p["ResultRole"]
        if rc is not None and not any(self.repo.namespace(n).get(rc) is not None
                                      for n in self.repo.namespace_names):
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"class {rc[:128]!r} does not exist in any namespace")
        role = role.lower() if role is not None else None
        rrole = rrole.lower() if rrole is not None else None
        seen: dict[tuple, CIMInstanceName | CIMInstance] = {}
        keys = PathKeys(ns.name)
        pace = Pacer()
        for leaf, prov in self._assoc_classes(ns, p["AssocClass"]):
            found = prov.associated(leaf, source)
            if found is None:
                found = [(via, name, target)
                         for assoc, via in await self._leaf_references(ns, leaf, prov, source,
                                                                       p["Role"])
                         for name, target in reference_values(assoc) if name != via]
            for via, name, target in found:
                if role is not None and via.lower() != role:
                    continue
                if rrole is not None and name.lower() != rrole:
                    continue
                if rc is not None:
                    tns = self.repo.namespace((target.namespace
                                               if isinstance(target, CIMInstanceName)
                                               else namespace_of(target)) or ns.name)
                    if not tns.is_subclass(target.classname, rc):
                        continue
                seen.setdefault(keys.of(target) if isinstance(target, CIMInstanceName)
                                else object_key(target, ns.name), target)
                await pace.tick()
        return list(seen.values())

    async def _associator_paths(self, ns: Namespace, source: CIMInstanceName,
                                p: dict) -> list[CIMInstanceName]:
        return [t if isinstance(t, CIMInstanceName) else t.path
                for t in await self._associated(ns, source, p)]

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
        pace = Pacer()
        for target in await self._associated(ns, source, p):
            if not isinstance(target, CIMInstanceName):
                out.append(target)
                continue
            try:
                out.append(await self.get_instance(target))
            except CIMError as exc:
                if exc.status_code != pywbem.CIM_ERR_NOT_FOUND:
                    raise
                log.debug("associated instance %s vanished", target)
            await pace.tick()
        return out

    async def op_Associators(self, ns: Namespace, p: dict, ctx) -> Result:
        return Result(pieces_of(*await self._with_paths(
            ns, await self._associators(ns, p["ObjectName"], p), p, True, None, OWP)))

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
        return Result(pieces_of(*await self._with_paths(
            ns, await self._reference_instances(ns, p["ObjectName"], p), p, True, None, OWP,
            own_ns=False)))

    async def op_ReferenceNames(self, ns: Namespace, p: dict, ctx) -> Result:
        return Result([w.objectpath_xml(a.path, self.host)
                       for a in await self._reference_instances(ns, p["ObjectName"], p)])

    # -- pull operations: pullops.py -------------------------------------------------

    async def _with_paths(self, ns: Namespace, insts: Iterable[CIMInstance], p: dict,
                          deep: bool, classname: str | None, wrap: tuple[bytes, bytes],
                          own_ns: bool = True) -> tuple[list, list[int]]:
        """An item of pieces per instance with its full path (OpenAssociatorInstances,
        OpenReferenceInstances: VALUE.INSTANCEWITHPATH, Associators and References:
        VALUE.OBJECTWITHPATH) and their byte offsets. Class origins come from each
        instance's own namespace (`own_ns`)."""
        view = self.views.get(ns, classname or "", deep, p["PropertyList"],
                              p["IncludeClassOrigin"])
        render = with_path(view, self.paths, self.host, ns.name, wrap,
                           self.repo.namespace if own_ns else None)
        return await self.renders.items(None, insts, render)


_END = {True: encode(w.message_end(True)), False: encode(w.message_end(False))}


class _GetPlan:
    """What an ordinary GetInstance of one request shape resolved (Dispatcher.quick_get);
    good while the repository and the providers registered are the same."""

    __slots__ = ("repo", "generation", "provider", "classname", "names", "view")

    def __init__(self, repo: Repository, generation: int, provider: Provider,
                 classname: str, names: tuple[str, ...], view: Any):
        self.repo, self.generation, self.provider = repo, generation, provider
        self.classname, self.names, self.view = classname, names, view


Handler = Callable[[Dispatcher, Namespace, dict[str, Any], OperationContext], Awaitable[Result]]

# DSP0200 intrinsic operations: name -> (parameter signature, handler). The one table
# the dispatcher consults; an operation missing here is CIM_ERR_NOT_SUPPORTED.
OPERATIONS: dict[str, tuple[Signature, Handler]] = {
    "GetClass": (SIGNATURES["GetClass"], Dispatcher.op_GetClass),
    "EnumerateClasses": (SIGNATURES["EnumerateClasses"], Dispatcher.op_EnumerateClasses),
    "EnumerateClassNames": (SIGNATURES["EnumerateClassNames"], Dispatcher.op_EnumerateClassNames),
    "GetQualifier": (SIGNATURES["GetQualifier"], Dispatcher.op_GetQualifier),
    "EnumerateQualifiers": (SIGNATURES["EnumerateQualifiers"], Dispatcher.op_EnumerateQualifiers),
    "GetInstance": (SIGNATURES["GetInstance"], Dispatcher.op_GetInstance),
    "EnumerateInstances": (SIGNATURES["EnumerateInstances"], Dispatcher.op_EnumerateInstances),
    "EnumerateInstanceNames": (SIGNATURES["EnumerateInstanceNames"], Dispatcher.op_EnumerateInstanceNames),
    "Associators": (SIGNATURES["Associators"], Dispatcher.op_Associators),
    "AssociatorNames": (SIGNATURES["AssociatorNames"], Dispatcher.op_AssociatorNames),
    "References": (SIGNATURES["References"], Dispatcher.op_References),
    "ReferenceNames": (SIGNATURES["ReferenceNames"], Dispatcher.op_ReferenceNames),
    "OpenEnumerateInstances": (SIGNATURES["OpenEnumerateInstances"], pullops.op_OpenEnumerateInstances),
    "OpenEnumerateInstancePaths": (SIGNATURES["OpenEnumerateInstancePaths"],
                                   pullops.op_OpenEnumerateInstancePaths),
    "OpenAssociatorInstances": (SIGNATURES["OpenAssociatorInstances"], pullops.op_OpenAssociatorInstances),
    "OpenAssociatorInstancePaths": (SIGNATURES["OpenAssociatorInstancePaths"],
                                    pullops.op_OpenAssociatorInstancePaths),
    "OpenReferenceInstances": (SIGNATURES["OpenReferenceInstances"], pullops.op_OpenReferenceInstances),
    "OpenReferenceInstancePaths": (SIGNATURES["OpenReferenceInstancePaths"],
                                   pullops.op_OpenReferenceInstancePaths),
    "PullInstancesWithPath": (SIGNATURES["PullInstancesWithPath"], pullops.op_PullInstancesWithPath),
    "PullInstancePaths": (SIGNATURES["PullInstancePaths"], pullops.op_PullInstancePaths),
    "CloseEnumeration": (SIGNATURES["CloseEnumeration"], pullops.op_CloseEnumeration),
    "CreateInstance": (SIGNATURES["CreateInstance"], writes.op_CreateInstance),
    "ModifyInstance": (SIGNATURES["ModifyInstance"], writes.op_ModifyInstance),
    "DeleteInstance": (SIGNATURES["DeleteInstance"], writes.op_DeleteInstance),
    "ExecQuery": (SIGNATURES["ExecQuery"], queries.op_ExecQuery),
    "OpenQueryInstances": (SIGNATURES["OpenQueryInstances"], queries.op_OpenQueryInstances),
    "PullInstances": (SIGNATURES["PullInstances"], queries.op_PullInstances),
}
_OPERATIONS_BY_LOWER = {name.lower(): (name, row) for name, row in OPERATIONS.items()}
