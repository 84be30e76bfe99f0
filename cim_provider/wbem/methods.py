"""Extrinsic methods (DSP0200 InvokeMethod): the target, the declared parameters, reference
and embedded-instance parameters typed like any other value, then the provider.

Only operators may invoke methods. The provider receives parameters under their
declared names and types; what it must still check is in provider.py.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pywbem
from pywbem import CIMClassName, CIMError, CIMInstance, CIMInstanceName

from . import writer as w
from .context import OperationContext
from .embedded import parse_embedded_instance
from .params import convert_value
from .repository import Namespace
from .request import CIMRequest
from .writes import typed_instance

if TYPE_CHECKING:
    from .dispatch import Dispatcher


async def invoke_method(d: Dispatcher, req: CIMRequest, ctx: OperationContext) -> list[str]:
    """An extrinsic method call: target and parameters checked against the class's
    declaration (DSP0200 3.3.5), then the provider's invoke_method; the response pieces."""
    if ctx.role != "operator":
        raise CIMError(pywbem.CIM_ERR_ACCESS_DENIED,
                       f"user {ctx.user!r} may not invoke methods (role {ctx.role})")
    ns = d.repo.namespace(req.namespace)
    target = req.target
    assert target is not None            # parse_request sets it on every extrinsic call
    if isinstance(target, CIMInstanceName):
        cls = d.get_class(ns, target.classname, pywbem.CIM_ERR_INVALID_CLASS)
        target = d.normalize_path(ns, target)
        try:
            await d.get_instance(target, ns)
        except CIMError as exc:
            # DSP0200: a method on an instance that does not exist is CIM_ERR_NOT_FOUND,
            # unless its provider knows of it where this server does not show it (a
            # farm system running on another host: a start answers where it runs) and
            # says so by naming the method, lower case, in its `invokes_on_missing`
            # (e.g. providers/computer_system.py).
            prov = d.registry.provider(ns.name, cls.classname)
            if exc.status_code != pywbem.CIM_ERR_NOT_FOUND or \
                    req.method.lower() not in getattr(prov, "invokes_on_missing", ()):
                raise
    else:
        cls = d.get_class(ns, target.classname, pywbem.CIM_ERR_INVALID_CLASS)
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
            value = [_param_path(d, ns, v, decl.name) for v in value] \
                if decl.is_array else _param_path(d, ns, value, decl.name)
        elif decl.qualifiers.get("EmbeddedInstance") is not None and value is not None:
            value = [await _embedded(d, ns, decl, v, f"{decl.name}[{i}]")
                     for i, v in enumerate(value)] if decl.is_array \
                else await _embedded(d, ns, decl, value, decl.name)
        params[decl.name] = value
    prov = d.registry.provider(ns.name, cls.classname)
    if prov is None:
        raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                       f"{cls.classname}.{method.name} is not implemented")
    rv, out = await prov.invoke_method(target, method.name, params)
    ctx.outcome = rv                     # for the audit record (audit.py)
    pieces = [w.returnvalue_xml(rv, method.return_type)]
    for name, value in (out or {}).items():
        decl = decls.get(name.lower())
        pieces.append(w.paramvalue_xml(decl.name if decl else name, value,
                                       decl.type if decl else None, _embedded_kind(decl)))
    return pieces


def _embedded_kind(decl: Any) -> str | None:
    """"instance" / "object" for a parameter declared EmbeddedInstance / EmbeddedObject:
    its value goes out marked as DSP0200 asks (writer.paramvalue_xml)."""
    if decl is None:
        return None
    if decl.qualifiers.get("EmbeddedInstance") is not None:
        return "instance"
    if decl.qualifiers.get("EmbeddedObject") is not None:
        return "object"
    return None


def _param_path(d: Dispatcher, ns: Namespace, path: CIMInstanceName, what: str) -> CIMInstanceName:
    """A reference parameter, normalized like any path (key names and types).
    A namespace this server does not have is taken as the method's own: wbemcli
    sends `root/virt:Class.k="v"` as host "root", namespace "virt"."""
    path = path.copy()
    if path.namespace:
        try:
            d.repo.namespace(path.namespace)
        except CIMError:
            path.namespace = ns.name
    return d.normalize_path(ns, path, pywbem.CIM_ERR_INVALID_PARAMETER)

async def _embedded(d: Dispatcher, ns: Namespace, decl, value: Any, what: str) -> CIMInstance:
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
        return typed_instance(d, ns, cls, inst, None)
    except CIMError as exc:
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                       f"{what}: {exc.status_description}") from None


def _is_input(decl: Any) -> bool:
    q = decl.qualifiers
    if q.get("In") is not None:
        return bool(q["In"].value)
    return True     # In defaults to true in the CIM meta-model
