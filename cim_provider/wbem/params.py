"""DSP0200 parameter signatures and the conversion of sent values to declared types.

Each intrinsic operation's parameters, their converters and DSP0200 defaults are one
table (`SIGNATURES`); `convert_params` applies it to what a request sent, and
`convert_value` converts a method parameter or key value to a declared CIM type.
Every failure is CIM_ERR_INVALID_PARAMETER naming the parameter.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import pywbem
from pywbem import CIMClass, CIMClassName, CIMDateTime, CIMError, CIMInstance, CIMInstanceName

_REQUIRED = object()

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
Signature = dict[str, tuple[Callable[[str, Any], Any], Any]]
SIGNATURES: dict[str, Signature] = {
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


def convert_params(op: str, sent: dict[str, Any],
                   sig: Signature | None = None) -> dict[str, Any]:
    """The parameters `op` was sent, by canonical name, converted, defaults filled in."""
    if sig is None:
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
                       f"{what}: invalid {cimtype} value ({short(exc)})") from None


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


def short(exc: object, limit: int = 200) -> str:
    s = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return s if len(s) <= limit else s[:limit] + "..."
