"""What the client asked to see of a class or instance: PropertyList, LocalOnly,
DeepInheritance and IncludeClassOrigin applied to the provider's complete objects.

DSP0200 GetInstance/EnumerateInstances: PropertyList names the properties to return
(unknown names are ignored); DeepInheritance false keeps only the properties of the
requested class; an unchanged view is the provider's own object, so its cached
CIM-XML can be used as is.
"""
from __future__ import annotations

from pywbem import CIMClass, CIMInstance

from .repository import Namespace


def class_view(cls: CIMClass, local_only: bool, property_list: list[str] | None) -> CIMClass:
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


def allowed_properties(ns: Namespace, classname: str, deep: bool,
             property_list: list[str] | None) -> set[str] | None:
    allowed = None if property_list is None else {p.lower() for p in property_list}
    if not deep:
        own = {n.lower() for n in ns.require(classname).properties}
        allowed = own if allowed is None else allowed & own
    return allowed

def instance_view(ns: Namespace, inst: CIMInstance, allowed: set[str] | None,
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
