"""CreateInstance, ModifyInstance and DeleteInstance (DSP0200 3.3.x): operators only,
instances typed against their class, then the class's provider; a class without a
provider is read-only (CIM_ERR_NOT_SUPPORTED, docs/architecture.md "Errors")."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pywbem
from pywbem import CIMClass, CIMError, CIMInstance, CIMInstanceName

from . import writer as w
from .context import OperationContext, Result
from .params import convert_value
from .provider import Provider
from .repository import Namespace

if TYPE_CHECKING:
    from .dispatch import Dispatcher


def _require_operator(ctx: OperationContext, what: str) -> None:
    if ctx.role != "operator":
        raise CIMError(pywbem.CIM_ERR_ACCESS_DENIED,
                       f"user {ctx.user!r} may not {what} (role {ctx.role})")

def typed_instance(d: Dispatcher, ns: Namespace, cls: CIMClass, inst: CIMInstance,
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
                value = d.normalize_path(ns, value, pywbem.CIM_ERR_INVALID_PARAMETER)
            except CIMError as exc:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"{decl.name}: {exc.status_description}") from None
        props[decl.name] = pywbem.CIMProperty(
            decl.name, value, type=decl.type, reference_class=decl.reference_class,
            embedded_object=decl.embedded_object, is_array=decl.is_array)
    return CIMInstance(cls.classname, properties=props, path=path)

def _writer(d: Dispatcher, ns: Namespace, classname: str) -> Provider:
    prov = d.registry.provider(ns.name, classname)
    if prov is None:     # docs/architecture.md "Errors": read-only classes refuse writes
        raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                       f"instances of {classname} are read-only")
    return prov

async def op_CreateInstance(d: Dispatcher, ns: Namespace, p: dict[str, Any],
                            ctx: OperationContext) -> Result:
    # DSP0200 CreateInstance: NewInstance in, the new instance's INSTANCENAME out;
    # the path of NewInstance, if any, is ignored.
    _require_operator(ctx, "create instances")
    cls = d.get_class(ns, p["NewInstance"].classname)
    prov = _writer(d, ns, cls.classname)
    inst = typed_instance(d, ns, cls, p["NewInstance"], None)
    path = ctx.outcome = await prov.create_instance(inst, ctx)     # outcome: for the audit
    return Result([w.instancename_xml(path)])

async def op_ModifyInstance(d: Dispatcher, ns: Namespace, p: dict[str, Any],
                            ctx: OperationContext) -> Result:
    _require_operator(ctx, "modify instances")
    inst = p["ModifiedInstance"]
    if inst.path is None:
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "ModifiedInstance has no path")
    path = d.normalize_path(ns, inst.path)
    cls = d.get_class(ns, path.classname)
    prov = _writer(d, ns, cls.classname)
    await prov.modify_instance(typed_instance(d, ns, cls, inst, path), p["PropertyList"],
                               ctx)
    return Result(None)

async def op_DeleteInstance(d: Dispatcher, ns: Namespace, p: dict[str, Any],
                            ctx: OperationContext) -> Result:
    _require_operator(ctx, "delete instances")
    path = d.normalize_path(ns, p["InstanceName"])
    await _writer(d, ns, path.classname).delete_instance(path, ctx)
    return Result(None)
