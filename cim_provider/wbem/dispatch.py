"""Operation dispatch: the generic CIM rules of DSP0200, applied once for every class.

The dispatcher resolves classes in the repository, fans enumerations out to the
providers of every subclass, walks associations, manages pull contexts and turns
everything into CIM-XML fragments. Parameter signatures and conversion are in
params.py, the PropertyList/LocalOnly/ClassOrigin views in views.py, extrinsic methods
in methods.py. Providers only produce complete instances (see provider.py for the
contract).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable
from typing import Any, Callable

import pywbem
from pywbem import CIMClass, CIMClassName, CIMError, CIMInstance, CIMInstanceName

from . import wql, writes
from . import writer as w
from .audit import AuditHook, report
from .context import OperationContext, Result
from .methods import invoke_method
from .params import SIGNATURES, UNSUPPORTED, Signature, convert_params, convert_value
from .queries import check_query
from .provider import AssociationProvider, Provider, Registry, path_key, rendered
from .pull import PullContexts
from .repository import Namespace, Repository
from .request import CIMRequest
from .views import allowed_properties, class_view, instance_view

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

    # -- entry point ---------------------------------------------------------

    async def handle(self, req: CIMRequest, ctx: OperationContext) -> list[str]:
        """Response body pieces for a parsed request; CIM errors become ERROR; writes audited."""
        try:
            if req.duplicate is not None:
                # DSP0200: each parameter at most once; names are case-insensitive
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"parameter {req.duplicate[:64]!r} given twice")
            if req.intrinsic:
                res = await self._intrinsic(req, ctx)
                inner = [] if res.body is None else ["<IRETURNVALUE>", *res.body, "</IRETURNVALUE>"]
                inner += res.params or []
            else:
                inner = await invoke_method(self, req, ctx)
        except CIMError as exc:
            log.info("%s in %s: %s %s", req.method, req.namespace, exc.status_code_name,
                     exc.status_description)
            inner = [w.error_xml(exc.status_code, exc.status_description or "")]
            ctx.outcome = exc
        except Exception:
            log.exception("internal error in %s", req.method)
            inner = [w.error_xml(pywbem.CIM_ERR_FAILED, "internal error; see the server log")]
            ctx.outcome = CIMError(pywbem.CIM_ERR_FAILED)
        report(self.audit, req, ctx, self.repo)
        return [w.message_start(req.msg_id, req.intrinsic, req.method), *inner,
                w.message_end(req.intrinsic)]

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
        """(leaf class, provider) for every registered class at or under `classname`."""
        out: list[tuple[str, Provider]] = []
        for leaf in self.registry.classes(ns.name):
            if ns.is_subclass(leaf, classname):
                cls, prov = ns.get(leaf), self.registry.provider(ns.name, leaf)
                if cls is not None and prov is not None:   # prov: leaf is registered
                    out.append((cls.classname, prov))
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

    async def op_GetInstance(self, ns: Namespace, p: dict, ctx) -> Result:
        path = self.normalize_path(ns, p["InstanceName"])
        inst = await self.get_instance(path, ns)
        view = instance_view(ns, inst, allowed_properties(ns, inst.classname, True, p["PropertyList"]),
                          p["IncludeClassOrigin"])
        if view is inst:
            return Result([self._body(inst)])
        return Result([w.instance_xml(view, class_origin=p["IncludeClassOrigin"])])

    async def op_EnumerateInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self.get_class(ns, p["ClassName"])
        allowed = allowed_properties(ns, cls.classname, p["DeepInheritance"], p["PropertyList"])
        co = p["IncludeClassOrigin"]
        out = []
        for inst in await self._enumerate(ns, cls.classname):
            view = instance_view(ns, inst, allowed, co)
            if view is inst:
                out.append(w.value_namedinstance_xml(inst, self._body(inst), rendered(
                    inst, "name", lambda: w.instancename_xml(inst.path))))
            else:
                out.append(w.value_namedinstance_xml(inst, w.instance_xml(view, class_origin=co)))
        return Result(out)

    async def op_EnumerateInstanceNames(self, ns: Namespace, p: dict, ctx) -> Result:
        cls = self.get_class(ns, p["ClassName"])
        return Result([w.instancename_xml(path)
                       for path in await self._enumerate_names(ns, cls.classname)])

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

    async def _associator_paths(self, ns: Namespace, source: CIMInstanceName,
                                p: dict) -> list[CIMInstanceName]:
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
            view = instance_view(self.repo.namespace(inst.path.namespace), inst,
                              allowed_properties(ns, inst.classname, True, p["PropertyList"]), co)
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
            allowed = allowed_properties(ns, inst.classname, True, p["PropertyList"])
            view = instance_view(ns, inst, allowed, co)
            out.append(self._with_path(inst, view, co, w.value_objectwithpath_xml))
        return Result(out)

    async def op_ReferenceNames(self, ns: Namespace, p: dict, ctx) -> Result:
        return Result([w.objectpath_xml(a.path, self.host)
                       for a in await self._reference_instances(ns, p["ObjectName"], p)])

    # -- pull operations --------------------------------------------------------------

    def _check_open(self, p: dict) -> float:
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
            allowed = allowed_properties(ns, classname or inst.classname, deep, p["PropertyList"])
            view = instance_view(self.repo.namespace(inst.path.namespace or ns.name), inst, allowed, co)
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
        cls = self.get_class(ns, p["ClassName"])
        items = self._iwp(ns, await self._enumerate(ns, cls.classname), p,
                          p["DeepInheritance"], cls.classname)
        return self._open(ns, p, ctx, "instances", items)

    async def op_OpenEnumerateInstancePaths(self, ns: Namespace, p: dict, ctx) -> Result:
        self._check_open(p)
        cls = self.get_class(ns, p["ClassName"])
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

    # -- queries ---------------------------------------------------------------------------

    async def _query_instances(self, ns: Namespace, query: wql.Query,
                               cls: CIMClass) -> list[CIMInstance]:
        allowed = None if query.select is None else {n.lower() for n in query.select}
        return [instance_view(ns, inst, allowed, False)
                for inst in await self._enumerate(ns, cls.classname)
                if wql.matches(query, inst, ns.is_subclass)]

    async def op_ExecQuery(self, ns: Namespace, p: dict, ctx) -> Result:
        query, cls = check_query(ns, p["QueryLanguage"], p["Query"])
        return Result([w.value_objectwithpath_xml(inst, None, self.host)
                       for inst in await self._query_instances(ns, query, cls)])

    async def op_OpenQueryInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        # DSP0200 OpenQueryInstances: the result is pulled with PullInstances, which
        # returns INSTANCE elements without paths.
        if p["ContinueOnError"]:
            raise CIMError(pywbem.CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED,
                           "ContinueOnError is not supported")
        timeout = self.pulls.check_timeout(p["OperationTimeout"])
        query, cls = check_query(ns, p["FilterQueryLanguage"], p["FilterQuery"])
        items = [w.instance_xml(inst) for inst in await self._query_instances(ns, query, cls)]
        ctx_id, chunk, eos = self.pulls.open(ns.name, "query", items, p["MaxObjectCount"],
                                             timeout, ctx.client)
        res = self._pull_result(chunk, eos, ctx_id)
        if p["ReturnQueryResultClass"]:
            view = class_view(cls, False, None if query.select is None
                                    else list(query.select))
            assert res.params is not None        # _pull_result always sets them
            res.params.insert(0, w.paramvalue_class_xml("QueryResultClass", view))
        return res

    async def op_PullInstances(self, ns: Namespace, p: dict, ctx) -> Result:
        chunk, eos, ctx_id = self.pulls.pull(ns.name, "query", p["EnumerationContext"],
                                             p["MaxObjectCount"], ctx.client)
        return self._pull_result(chunk, eos, ctx_id)


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
    "OpenEnumerateInstances": (SIGNATURES["OpenEnumerateInstances"], Dispatcher.op_OpenEnumerateInstances),
    "OpenEnumerateInstancePaths": (SIGNATURES["OpenEnumerateInstancePaths"],
                                   Dispatcher.op_OpenEnumerateInstancePaths),
    "OpenAssociatorInstances": (SIGNATURES["OpenAssociatorInstances"], Dispatcher.op_OpenAssociatorInstances),
    "OpenAssociatorInstancePaths": (SIGNATURES["OpenAssociatorInstancePaths"],
                                    Dispatcher.op_OpenAssociatorInstancePaths),
    "OpenReferenceInstances": (SIGNATURES["OpenReferenceInstances"], Dispatcher.op_OpenReferenceInstances),
    "OpenReferenceInstancePaths": (SIGNATURES["OpenReferenceInstancePaths"],
                                   Dispatcher.op_OpenReferenceInstancePaths),
    "PullInstancesWithPath": (SIGNATURES["PullInstancesWithPath"], Dispatcher.op_PullInstancesWithPath),
    "PullInstancePaths": (SIGNATURES["PullInstancePaths"], Dispatcher.op_PullInstancePaths),
    "CloseEnumeration": (SIGNATURES["CloseEnumeration"], Dispatcher.op_CloseEnumeration),
    "CreateInstance": (SIGNATURES["CreateInstance"], writes.op_CreateInstance),
    "ModifyInstance": (SIGNATURES["ModifyInstance"], writes.op_ModifyInstance),
    "DeleteInstance": (SIGNATURES["DeleteInstance"], writes.op_DeleteInstance),
    "ExecQuery": (SIGNATURES["ExecQuery"], Dispatcher.op_ExecQuery),
    "OpenQueryInstances": (SIGNATURES["OpenQueryInstances"], Dispatcher.op_OpenQueryInstances),
    "PullInstances": (SIGNATURES["PullInstances"], Dispatcher.op_PullInstances),
}
_OPERATIONS_BY_LOWER = {name.lower(): (name, row) for name, row in OPERATIONS.items()}
