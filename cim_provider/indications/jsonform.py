"""The JSON form of interop instances in subscriptions.json (indications/subscriptions.py)."""
from __future__ import annotations

import logging
from typing import Any

from pywbem import CIMInstance, CIMInstanceName, CIMProperty

from ..wbem.repository import Namespace

log = logging.getLogger(__name__)


def to_json(value: Any) -> Any:
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, CIMInstanceName):
        return {"classname": value.classname, "namespace": value.namespace,
                "keybindings": {k: to_json(v) for k, v in value.keybindings.items()}}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)        # strings, Char16, CIMDateTime


def ref_from_json(d: dict) -> CIMInstanceName:
    return CIMInstanceName(d["classname"], {k: (ref_from_json(v) if isinstance(v, dict) else v)
                                            for k, v in d["keybindings"].items()},
                           namespace=d.get("namespace"))


def typed(ns: Namespace, classname: str, values: dict[str, Any], where: str) -> CIMInstance:
    """An instance from JSON values, typed by the class (unknown names are dropped)."""
    cls = ns.require(classname)
    props = {}
    for name, value in values.items():
        decl = cls.properties.get(name)
        if decl is None:
            log.warning("%s in %s: ignoring unknown property %s", classname, where, name)
            continue
        if decl.type == "reference" and value is not None:
            value = ref_from_json(value)
        props[decl.name] = CIMProperty(decl.name, value, type=decl.type,
                                       reference_class=decl.reference_class,
                                       is_array=decl.is_array)
    return CIMInstance(cls.classname, properties=props)
