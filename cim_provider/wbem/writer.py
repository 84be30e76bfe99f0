"""The CIM-XML writer (DSP0201): pywbem objects in, str fragments out.

Why our own: pywbem's `tocimxml()` builds a DOM per object (about 440 µs per
instance here) and writes self-closing tags, which sblim wbemcli's hand-written
parser cannot read. This writer concatenates strings, never self-closes an element,
gives INSTANCE only CLASSNAME, ERROR only CODE and DESCRIPTION and PARAMVALUE only
NAME and PARAMTYPE (what wbemcli accepts) -- plus EmbeddedObject on an embedded
instance (DSP0201: a string parameter holding escaped INSTANCE XML, e.g. GetError's
Error), which wbemcli ignores and pywbem decodes -- and leaves NULL output parameters out.

Every function returns a `str`; the HTTP layer joins and encodes the pieces.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from pywbem import (CIMClass, CIMClassName, CIMDateTime, CIMInstance,
                    CIMInstanceName, CIMMethod, CIMParameter, CIMProperty,
                    CIMQualifier, CIMQualifierDeclaration)
from pywbem._cim_types import cimtype as _pywbem_cimtype  # only here

XML_DECL = '<?xml version="1.0" encoding="utf-8" ?>\n'

# What `esc` rewrites: the five XML specials and CR (as references), and characters XML
# 1.0 cannot carry at all (DSP0201 values are XML text), replaced by U+FFFD so a hostile
# name cannot make the whole response unparseable.
_NEEDS_ESCAPE = re.compile("[&<>\"'\x00-\x08\x0b\x0c\x0e-\x1f\r\ufffe\uffff\ud800-\udfff]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;",
            "\r": "&#13;"}


def _escape_match(m: re.Match) -> str:
    return _ESCAPES.get(m.group(), "\ufffd")


def esc(s: str) -> str:
    """Escape text or an attribute value (`<>&"'`, CR kept as a reference)."""
    if _NEEDS_ESCAPE.search(s) is None:
        return s
    return _NEEDS_ESCAPE.sub(_escape_match, s)


def esc_attr(s: str) -> str:
    """Escape free text for an attribute value: as `esc`, plus newline and tab as
    references (an XML reader turns literal ones into spaces in attributes)."""
    s = esc(s)
    if "\n" in s or "\t" in s:
        s = s.replace("\n", "&#10;").replace("\t", "&#9;")
    return s


# --- values -------------------------------------------------------------------

def _float_text(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "INF" if v > 0 else "-INF"
    return repr(float(v))


def scalar_text(value: object) -> str:
    """The text of one non-NULL scalar value inside VALUE / KEYVALUE."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, CIMDateTime):
        return str(value)
    if isinstance(value, (datetime, timedelta)):
        return str(CIMDateTime(value))
    raise TypeError(f"cannot write a {type(value).__name__} as a CIM scalar")


def value_xml(value: object, type_: str | None = None) -> str:
    """VALUE, VALUE.ARRAY, VALUE.REFARRAY or VALUE.REFERENCE for a non-NULL value."""
    if isinstance(value, (list, tuple)):
        tag = "VALUE.REFARRAY" if type_ == "reference" or any(
            isinstance(v, (CIMInstanceName, CIMClassName)) for v in value) else "VALUE.ARRAY"
        return f"<{tag}>" + "".join(
            "<VALUE.NULL></VALUE.NULL>" if v is None else _scalar_value_xml(v, type_)
            for v in value) + f"</{tag}>"
    return _scalar_value_xml(value, type_)


def _scalar_value_xml(value: object, type_: str | None) -> str:
    if isinstance(value, CIMInstanceName):
        return "<VALUE.REFERENCE>" + reference_path_xml(value) + "</VALUE.REFERENCE>"
    if isinstance(value, CIMClassName):
        return "<VALUE.REFERENCE>" + classpath_ref_xml(value) + "</VALUE.REFERENCE>"
    if isinstance(value, CIMInstance):
        return "<VALUE>" + esc(instance_xml(value)) + "</VALUE>"
    if isinstance(value, CIMClass):
        return "<VALUE>" + esc(class_xml(value, class_origin=True)) + "</VALUE>"
    return "<VALUE>" + esc(scalar_text(value)) + "</VALUE>"


def cimtype_of(value: object) -> str:
    """The CIM type name of a Python/pywbem value (first non-NULL element of arrays)."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v is not None), None)
        if value is None:
            return "string"
    return _pywbem_cimtype(value)


# --- names and paths ------------------------------------------------------------

def _keyvalue_xml(value: object) -> str:
    if isinstance(value, CIMInstanceName):
        return "<VALUE.REFERENCE>" + reference_path_xml(value) + "</VALUE.REFERENCE>"
    if isinstance(value, bool):
        return f'<KEYVALUE VALUETYPE="boolean" TYPE="boolean">{"TRUE" if value else "FALSE"}</KEYVALUE>'
    if isinstance(value, (int, float)):
        if type(value) in (int, float):      # untyped Python number: no TYPE attribute
            return f'<KEYVALUE VALUETYPE="numeric">{scalar_text(value)}</KEYVALUE>'
        return (f'<KEYVALUE VALUETYPE="numeric" TYPE="{_pywbem_cimtype(value)}">'
                f"{scalar_text(value)}</KEYVALUE>")
    if isinstance(value, str):
        return f'<KEYVALUE VALUETYPE="string" TYPE="string">{esc(value)}</KEYVALUE>'
    return (f'<KEYVALUE VALUETYPE="string" TYPE="{_pywbem_cimtype(value)}">'
            f"{esc(scalar_text(value))}</KEYVALUE>")


def instancename_xml(path: CIMInstanceName) -> str:
    """INSTANCENAME: class name and key bindings, without namespace or host."""
    parts = [f'<INSTANCENAME CLASSNAME="{esc(path.classname)}">']
    for name, value in path.keybindings.items():
        parts.append(f'<KEYBINDING NAME="{esc(name)}">{_keyvalue_xml(value)}</KEYBINDING>')
    parts.append("</INSTANCENAME>")
    return "".join(parts)


def localnamespacepath_xml(namespace: str) -> str:
    return "<LOCALNAMESPACEPATH>" + "".join(
        f'<NAMESPACE NAME="{esc(p)}"></NAMESPACE>' for p in namespace.strip("/").split("/") if p
    ) + "</LOCALNAMESPACEPATH>"


def namespacepath_xml(host: str, namespace: str) -> str:
    return (f"<NAMESPACEPATH><HOST>{esc(host)}</HOST>"
            f"{localnamespacepath_xml(namespace)}</NAMESPACEPATH>")


def instancepath_xml(path: CIMInstanceName, host: str | None = None,
                     namespace: str | None = None) -> str:
    """INSTANCEPATH: host, namespace and instance name (the path's own unless given)."""
    return ("<INSTANCEPATH>" + namespacepath_xml(host or path.host or "localhost",
                                                 namespace or path.namespace or "")
            + instancename_xml(path) + "</INSTANCEPATH>")


def reference_path_xml(path: CIMInstanceName) -> str:
    """The path element inside VALUE.REFERENCE: as much of the path as it carries."""
    if path.namespace and path.host:
        return instancepath_xml(path)
    if path.namespace:
        return ("<LOCALINSTANCEPATH>" + localnamespacepath_xml(path.namespace)
                + instancename_xml(path) + "</LOCALINSTANCEPATH>")
    return instancename_xml(path)


def classname_xml(name: str) -> str:
    return f'<CLASSNAME NAME="{esc(name)}"></CLASSNAME>'


def classpath_ref_xml(path: CIMClassName) -> str:
    if path.namespace and path.host:
        return ("<CLASSPATH>" + namespacepath_xml(path.host, path.namespace)
                + classname_xml(path.classname) + "</CLASSPATH>")
    if path.namespace:
        return ("<LOCALCLASSPATH>" + localnamespacepath_xml(path.namespace)
                + classname_xml(path.classname) + "</LOCALCLASSPATH>")
    return classname_xml(path.classname)


# --- qualifiers ---------------------------------------------------------------

def _flag(name: str, value: bool | None) -> str:
    return "" if value is None else f' {name}="{"true" if value else "false"}"'


def qualifier_xml(q: CIMQualifier) -> str:
    attrs = (f' NAME="{esc(q.name)}" TYPE="{q.type}"' + _flag("PROPAGATED", q.propagated)
             + _flag("OVERRIDABLE", q.overridable) + _flag("TOSUBCLASS", q.tosubclass)
             + _flag("TOINSTANCE", q.toinstance) + _flag("TRANSLATABLE", q.translatable))
    body = "" if q.value is None else value_xml(q.value, q.type)
    return f"<QUALIFIER{attrs}>{body}</QUALIFIER>"


def _qualifiers_xml(quals) -> str:
    return "".join(qualifier_xml(q) for q in quals.values())


def qualifier_declaration_xml(q: CIMQualifierDeclaration) -> str:
    attrs = f' NAME="{esc(q.name)}" TYPE="{q.type}"'
    if q.is_array:
        attrs += ' ISARRAY="true"'
        if q.array_size is not None:
            attrs += f' ARRAYSIZE="{int(q.array_size)}"'
    attrs += (_flag("OVERRIDABLE", q.overridable) + _flag("TOSUBCLASS", q.tosubclass)
              + _flag("TOINSTANCE", q.toinstance) + _flag("TRANSLATABLE", q.translatable))
    scope = ""
    if q.scopes:
        scope = "<SCOPE" + "".join(
            f' {k.upper()}="{"true" if v else "false"}"' for k, v in q.scopes.items()
            if k.upper() != "ANY") + "></SCOPE>"
        if q.scopes.get("ANY"):
            scope = "<SCOPE" + "".join(
                f' {k}="true"' for k in ("CLASS", "ASSOCIATION", "REFERENCE", "PROPERTY",
                                        "METHOD", "PARAMETER", "INDICATION")) + "></SCOPE>"
    body = "" if q.value is None else value_xml(q.value, q.type)
    return f"<QUALIFIER.DECLARATION{attrs}>{scope}{body}</QUALIFIER.DECLARATION>"


# --- properties, instances, classes ---------------------------------------------

def property_xml(p: CIMProperty, *, qualifiers: bool = False, class_origin: bool = False) -> str:
    """PROPERTY / PROPERTY.ARRAY / PROPERTY.REFERENCE; NULL is an element without VALUE."""
    attrs = f' NAME="{esc(p.name)}"'
    if p.type == "reference":
        if p.reference_class:
            attrs += f' REFERENCECLASS="{esc(p.reference_class)}"'
        if class_origin and p.class_origin:
            attrs += f' CLASSORIGIN="{esc(p.class_origin)}"'
        if class_origin and p.propagated is not None:
            attrs += _flag("PROPAGATED", p.propagated)
        quals = _qualifiers_xml(p.qualifiers) if qualifiers else ""
        val = ("" if p.value is None else
               "<VALUE.REFERENCE>" + reference_path_xml(p.value) + "</VALUE.REFERENCE>")
        return f"<PROPERTY.REFERENCE{attrs}>{quals}{val}</PROPERTY.REFERENCE>"
    tag = "PROPERTY.ARRAY" if p.is_array else "PROPERTY"
    attrs += f' TYPE="{p.type}"'
    if p.is_array and p.array_size is not None:
        attrs += f' ARRAYSIZE="{int(p.array_size)}"'
    if class_origin and p.class_origin:
        attrs += f' CLASSORIGIN="{esc(p.class_origin)}"'
    if class_origin and p.propagated is not None:
        attrs += _flag("PROPAGATED", p.propagated)
    if p.embedded_object:
        attrs += f' EmbeddedObject="{p.embedded_object}"'
    quals = _qualifiers_xml(p.qualifiers) if qualifiers else ""
    val = "" if p.value is None else value_xml(p.value, p.type)
    return f"<{tag}{attrs}>{quals}{val}</{tag}>"


def instance_xml(inst: CIMInstance, *, qualifiers: bool = False,
                 class_origin: bool = False) -> str:
    """INSTANCE with CLASSNAME only (wbemcli rejects other attributes)."""
    return (f'<INSTANCE CLASSNAME="{esc(inst.classname)}">'
            + (_qualifiers_xml(inst.qualifiers) if qualifiers else "")
            + "".join(property_xml(p, qualifiers=qualifiers, class_origin=class_origin)
                      for p in inst.properties.values())
            + "</INSTANCE>")


def _parameter_xml(p: CIMParameter, qualifiers: bool) -> str:
    quals = _qualifiers_xml(p.qualifiers) if qualifiers else ""
    name = esc(p.name)
    if p.type == "reference":
        rc = f' REFERENCECLASS="{esc(p.reference_class)}"' if p.reference_class else ""
        if p.is_array:
            size = f' ARRAYSIZE="{int(p.array_size)}"' if p.array_size is not None else ""
            return f'<PARAMETER.REFARRAY NAME="{name}"{rc}{size}>{quals}</PARAMETER.REFARRAY>'
        return f'<PARAMETER.REFERENCE NAME="{name}"{rc}>{quals}</PARAMETER.REFERENCE>'
    if p.is_array:
        size = f' ARRAYSIZE="{int(p.array_size)}"' if p.array_size is not None else ""
        return (f'<PARAMETER.ARRAY NAME="{name}" TYPE="{p.type}"{size}>{quals}'
                "</PARAMETER.ARRAY>")
    return f'<PARAMETER NAME="{name}" TYPE="{p.type}">{quals}</PARAMETER>'


def method_xml(m: CIMMethod, *, qualifiers: bool = False, class_origin: bool = False) -> str:
    attrs = f' NAME="{esc(m.name)}"'
    if m.return_type:
        attrs += f' TYPE="{m.return_type}"'
    if class_origin and m.class_origin:
        attrs += f' CLASSORIGIN="{esc(m.class_origin)}"'
    if class_origin and m.propagated is not None:
        attrs += _flag("PROPAGATED", m.propagated)
    return (f"<METHOD{attrs}>" + (_qualifiers_xml(m.qualifiers) if qualifiers else "")
            + "".join(_parameter_xml(p, qualifiers) for p in m.parameters.values())
            + "</METHOD>")


def class_xml(cls: CIMClass, *, qualifiers: bool = True, class_origin: bool = False) -> str:
    sup = f' SUPERCLASS="{esc(cls.superclass)}"' if cls.superclass else ""
    return (f'<CLASS NAME="{esc(cls.classname)}"{sup}>'
            + (_qualifiers_xml(cls.qualifiers) if qualifiers else "")
            + "".join(property_xml(p, qualifiers=qualifiers, class_origin=class_origin)
                      for p in cls.properties.values())
            + "".join(method_xml(m, qualifiers=qualifiers, class_origin=class_origin)
                      for m in cls.methods.values())
            + "</CLASS>")


# --- response wrappers -------------------------------------------------------------

def value_namedinstance_xml(inst: CIMInstance, body: str | None = None,
                            name: str | None = None) -> str:
    """VALUE.NAMEDINSTANCE (EnumerateInstances): INSTANCENAME then INSTANCE.
    `body` and `name` are the pieces when the caller already rendered them."""
    return ("<VALUE.NAMEDINSTANCE>" + (name if name is not None else instancename_xml(inst.path))
            + (body if body is not None else instance_xml(inst)) + "</VALUE.NAMEDINSTANCE>")


def value_objectwithpath_xml(inst: CIMInstance, body: str | None = None,
                             host: str | None = None, path: str | None = None) -> str:
    """VALUE.OBJECTWITHPATH (Associators, References): full INSTANCEPATH then INSTANCE."""
    return ("<VALUE.OBJECTWITHPATH>"
            + (path if path is not None else instancepath_xml(inst.path, host))
            + (body if body is not None else instance_xml(inst)) + "</VALUE.OBJECTWITHPATH>")


def value_instancewithpath_xml(inst: CIMInstance, body: str | None = None,
                               host: str | None = None, path: str | None = None) -> str:
    """VALUE.INSTANCEWITHPATH (pull operations)."""
    return ("<VALUE.INSTANCEWITHPATH>"
            + (path if path is not None else instancepath_xml(inst.path, host))
            + (body if body is not None else instance_xml(inst)) + "</VALUE.INSTANCEWITHPATH>")


def objectpath_xml(path: CIMInstanceName, host: str | None = None) -> str:
    """OBJECTPATH (AssociatorNames, ReferenceNames)."""
    return "<OBJECTPATH>" + instancepath_xml(path, host) + "</OBJECTPATH>"


def error_xml(code: int, description: str) -> str:
    return f'<ERROR CODE="{int(code)}" DESCRIPTION="{esc_attr(description)}"></ERROR>'


def message_start(msg_id: str, intrinsic: bool, method: str) -> str:
    tag = "IMETHODRESPONSE" if intrinsic else "METHODRESPONSE"
    return (XML_DECL + '<CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{esc(msg_id)}" PROTOCOLVERSION="1.0"><SIMPLERSP>'
            f'<{tag} NAME="{esc(method)}">')


def message_end(intrinsic: bool) -> str:
    tag = "IMETHODRESPONSE" if intrinsic else "METHODRESPONSE"
    return f"</{tag}></SIMPLERSP></MESSAGE></CIM>"


def _embedded_kind(value: object) -> str | None:
    """"instance" or "object" when `value` (or every non-NULL element of it) is an
    embedded CIMInstance or CIMClass, else None."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    kinds = {"instance" if isinstance(v, CIMInstance) else
             "object" if isinstance(v, CIMClass) else "" for v in items if v is not None}
    if kinds == {"instance"}:
        return "instance"
    if kinds and "" not in kinds:
        return "object"             # classes, or classes and instances mixed
    return None


def paramvalue_xml(name: str, value: object, type_: str | None = None,
                   embedded: str | None = None) -> str:
    """An output PARAMVALUE; NULL values are left out (wbemcli crashes on them).

    An embedded instance (a CIMInstance, or a list of them, as GetError's Error) is
    written as DSP0200 asks: PARAMTYPE="string", EmbeddedObject="instance" and a VALUE
    (VALUE.ARRAY) holding the escaped INSTANCE text, so a client hands back an
    instance, not a string. `embedded` ("instance" / "object", from the parameter's
    EmbeddedInstance / EmbeddedObject qualifier) marks a value that is already text.
    """
    if value is None:
        return ""
    type_ = type_ or cimtype_of(value)
    if type_ == "reference" or isinstance(value, CIMInstanceName):
        return f'<PARAMVALUE NAME="{esc(name)}" PARAMTYPE="reference">{value_xml(value)}</PARAMVALUE>'
    kind = _embedded_kind(value)
    if kind is None and embedded and type_ == "string" and all(
            isinstance(v, str) and v.lstrip().startswith("<")
            for v in (value if isinstance(value, (list, tuple)) else (value,)) if v is not None):
        kind = embedded
    if kind is None:
        return (f'<PARAMVALUE NAME="{esc(name)}" PARAMTYPE="{type_}">'
                f"{value_xml(value, type_)}</PARAMVALUE>")
    return (f'<PARAMVALUE NAME="{esc(name)}" PARAMTYPE="string" EmbeddedObject="{kind}">'
            f'{value_xml(value, "string")}</PARAMVALUE>')


def returnvalue_xml(value: object, type_: str | None = None) -> str:
    if value is None:
        return ""
    type_ = type_ or cimtype_of(value)
    return f'<RETURNVALUE PARAMTYPE="{type_}">{value_xml(value, type_)}</RETURNVALUE>'


def paramvalue_class_xml(name: str, cls: CIMClass) -> str:
    """A PARAMVALUE holding a CLASS (OpenQueryInstances' QueryResultClass)."""
    return (f'<PARAMVALUE NAME="{esc(name)}">' + class_xml(cls, qualifiers=False)
            + "</PARAMVALUE>")


def export_indication_xml(msg_id: str, indication: CIMInstance) -> str:
    """A complete export request (DSP0201 SIMPLEEXPREQ) delivering one indication:
    EXPMETHODCALL ExportIndication with the indication as the NewIndication INSTANCE."""
    return (XML_DECL + '<CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{esc(msg_id)}" PROTOCOLVERSION="1.0"><SIMPLEEXPREQ>'
            '<EXPMETHODCALL NAME="ExportIndication"><EXPPARAMVALUE NAME="NewIndication">'
            + instance_xml(indication)
            + "</EXPPARAMVALUE></EXPMETHODCALL></SIMPLEEXPREQ></MESSAGE></CIM>")
