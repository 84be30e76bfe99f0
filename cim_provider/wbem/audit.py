"""The audit record of a modifying operation (InvokeMethod, CreateInstance,
ModifyInstance, DeleteInstance, and the intrinsic writes this server refuses).

The dispatcher builds one `AuditRecord` after each such operation, whether it
succeeded or was refused, and hands it to its `audit` hook; server/audit.py formats
and writes it. No I/O here (docs/architecture.md "Layers").

A record never holds a secret: parameters are summarized here, before anything leaves
the protocol core. A parameter or property whose name looks like a password, secret or
credential is "***"; an embedded instance is its class and key properties (and
ElementName); embedded CIM-XML or MOF text (a string the method parses later) only its
class and length; long strings and arrays are cut; control characters are escaped, so a
record is one line whatever the client sent. The result is the method's return value, the
created path, "OK", or the CIM error code and name (never the error's description,
which may quote a value the client sent).
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pywbem
from pywbem import CIMClassName, CIMError, CIMInstance, CIMInstanceName

from .context import OperationContext
from .repository import Repository
from .request import CIMRequest

log = logging.getLogger(__name__)

# Intrinsic operations that change something (the last ones are refused by this
# server, CIM_ERR_NOT_SUPPORTED, but an attempt is still worth a record).
MODIFYING = frozenset(n.lower() for n in (
    "CreateInstance", "ModifyInstance", "DeleteInstance", "SetProperty", "CreateClass",
    "ModifyClass", "DeleteClass", "SetQualifier", "DeleteQualifier"))

SECRET = re.compile(r"pass(word|wd|phrase)|secret|credential", re.IGNORECASE)
MASK = "***"
MAX_TEXT = 80          # characters of a string value kept in a summary
MAX_ITEMS = 8          # elements of an array kept in a summary
MAX_PATH = 1024        # characters of a path kept (a subscription's path is ~400)
_EMBEDDED_XML = re.compile(r'<INSTANCE\b[^>]*\bCLASSNAME\s*=\s*"([^"]{1,128})"', re.IGNORECASE)
_EMBEDDED_MOF = re.compile(r"^\s*instance\s+of\s+(\w{1,128})", re.IGNORECASE)


@dataclass(frozen=True)
class AuditRecord:
    """One modifying operation: who, from where, what, on what, and how it ended."""
    time: float                       # seconds since the epoch, when it ended
    user: str                         # the authenticated user, or "local"
    client: str                       # the client's address
    operation: str                    # InvokeMethod, CreateInstance, ...
    method: str | None                # the extrinsic method (InvokeMethod only)
    namespace: str
    target: str                       # namespace:Class[.keys] the operation addressed
    params: dict[str, str] = field(default_factory=dict)   # name -> summary, no secrets
    ok: bool = True
    return_value: str | None = None   # InvokeMethod
    created: str | None = None        # CreateInstance: the new instance's path
    error_code: int | None = None
    error_name: str | None = None

    @property
    def result(self) -> str:
        """The outcome in a few words: `0`, `created PATH`, `OK` or `CIM_ERR_X (n)`."""
        if not self.ok:
            return f"{self.error_name} ({self.error_code})"
        if self.return_value is not None:
            return self.return_value
        if self.created is not None:
            return f"created {self.created}"
        return "OK"


AuditHook = Callable[[AuditRecord], None]


def is_modifying(req: CIMRequest) -> bool:
    return not req.intrinsic or req.method.lower() in MODIFYING


def report(hook: AuditHook | None, req: CIMRequest, ctx: OperationContext,
           repo: Repository) -> None:
    """Hand `hook` the record of `req` if it modifies something (the dispatcher's
    last step). A failing hook is logged: the operation has happened either way."""
    if hook is None or not is_modifying(req):
        return
    try:
        hook(audit_record(req, ctx, repo))
    except Exception:
        log.exception("cannot audit %s", req.method[:64])


def audit_record(req: CIMRequest, ctx: OperationContext, repo: Repository) -> AuditRecord:
    """The record of `req`, done for `ctx`: `ctx.outcome` is what it produced, or the
    CIMError that refused it."""
    ns = (req.namespace or "").strip("/")
    error = ctx.outcome if isinstance(ctx.outcome, CIMError) else None
    s = _Summarizer(ns, repo)
    if req.intrinsic:
        operation, method = _canonical(req.method), None
        params = dict(req.params)
        if operation == "ModifyInstance":
            params = _only_listed(params)
    else:
        operation, method = "InvokeMethod", _safe(req.method)
        declared = _declared_types(repo, ns, req)
        params = {n: _typed(t or declared.get(n.lower()), v) for n, (t, v) in req.params.items()}
    target = _target(req, params, ns)
    # NewInstance / ModifiedInstance in full; instances in method parameters: their keys
    summary = {_safe(name[:64]): s.value(name, value, top=req.intrinsic)
               for name, value in params.items()
               if not (req.intrinsic and name.lower() == "instancename")}
    rec: dict[str, Any] = {}
    if error is not None:
        rec = dict(ok=False, error_code=error.status_code,
                   error_name=error.status_code_name)
    elif not req.intrinsic:
        rec = dict(return_value=s.value("ReturnValue", ctx.outcome))
    elif isinstance(ctx.outcome, CIMInstanceName):
        rec = dict(created=path_text(ctx.outcome, ns))
    client = ctx.client          # authenticated: "user@address" (pull contexts' owner)
    if ctx.user and client.startswith(f"{ctx.user}@"):
        client = client[len(ctx.user) + 1:]
    return AuditRecord(time=time.time(), user=ctx.user or "local", client=client,
                       operation=operation, method=method, namespace=ns, target=target,
                       params=summary, **rec)


_PLAIN_TYPES = frozenset(("boolean", "uint8", "uint16", "uint32", "uint64", "sint8", "sint16",
                          "sint32", "sint64", "real32", "real64"))


class _Plain(str):
    """A number or boolean as the client wrote it: shown without quotes."""


def _typed(ptype: str | None, value: Any) -> Any:
    """Method parameters arrive as text; numbers and booleans are shown as such."""
    if ptype not in _PLAIN_TYPES:
        return value
    if isinstance(value, str):
        return _Plain(value)
    if isinstance(value, list):
        return [_Plain(v) if isinstance(v, str) else v for v in value]
    return value


def _declared_types(repo: Repository, ns: str, req: CIMRequest) -> dict[str, str]:
    """Lower-case parameter name -> declared type, for a client that sends no PARAMTYPE."""
    try:
        cls = repo.namespace(ns).get(req.target.classname) if req.target is not None else None
    except CIMError:
        return {}
    method = next((m for n, m in (cls.methods.items() if cls is not None else ())
                   if n.lower() == req.method.lower()), None)
    if method is None:
        return {}
    return {n.lower(): prm.type for n, prm in method.parameters.items()}


def _only_listed(params: dict[str, Any]) -> dict[str, Any]:
    """ModifyInstance with a PropertyList changes only those: the rest of
    ModifiedInstance (clients send the whole instance) is left out of the summary."""
    lower = {k.lower(): k for k in params}
    inst = params.get(lower.get("modifiedinstance", ""))
    names = params.get(lower.get("propertylist", ""))
    if not isinstance(inst, CIMInstance) or not isinstance(names, list):
        return params
    wanted = {str(n).lower() for n in names}
    out = inst.copy()
    for name in list(out.properties):
        if name.lower() not in wanted:
            del out.properties[name]
    return {**params, lower["modifiedinstance"]: out}


def _canonical(name: str) -> str:
    for known in ("CreateInstance", "ModifyInstance", "DeleteInstance", "SetProperty",
                  "CreateClass", "ModifyClass", "DeleteClass", "SetQualifier",
                  "DeleteQualifier"):
        if known.lower() == name.lower():
            return known
    return name[:64]


def _target(req: CIMRequest, params: dict[str, Any], ns: str) -> str:
    if not req.intrinsic:
        return path_text(req.target, ns) if req.target is not None else ns
    lower = {k.lower(): v for k, v in params.items()}
    for name in ("instancename", "modifiedinstance", "newinstance", "classname",
                 "newclass", "modifiedclass"):
        value = lower.get(name)
        if isinstance(value, CIMInstance):
            value = value.path if value.path is not None and name != "newinstance" \
                else CIMClassName(value.classname)
        if isinstance(value, pywbem.CIMClass):
            value = CIMClassName(value.classname)
        if isinstance(value, str):
            value = CIMClassName(value)
        if isinstance(value, (CIMInstanceName, CIMClassName)):
            return path_text(value, ns)
    return ns


def path_text(path: CIMInstanceName | CIMClassName | None, ns: str = "") -> str:
    """`namespace:Class.key="value",...` (keys with secret names masked), cut."""
    if path is None:
        return ns
    where = _safe((path.namespace or ns or "").strip("/"))
    text = f"{where}:{_safe(path.classname)}" if where else _safe(path.classname)
    if isinstance(path, CIMInstanceName):
        keys = []
        for name, value in sorted(path.keybindings.items()):
            if SECRET.search(name):
                keys.append(f"{_safe(name)}={MASK}")
            elif isinstance(value, CIMInstanceName):      # nested: quoted and escaped
                keys.append(f"{_safe(name)}={_quoted(path_text(value, where), MAX_PATH)}")
            elif isinstance(value, str):
                keys.append(f"{_safe(name)}={_quoted(value)}")
            else:
                keys.append(f"{_safe(name)}={_safe(str(value))}")
        text += "." + ",".join(keys)
    return _cut(text, MAX_PATH)


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _safe(text: str) -> str:
    """A name from the request (class, property, namespace), cut, without control
    characters: parsed names are plain, but a record must stay one line whatever comes."""
    return "".join(c if c.isprintable() else "?" for c in _cut(text, 128))


def _quoted(value: str, limit: int = MAX_TEXT) -> str:
    """A client's string, cut, in double quotes; quotes, backslashes and characters
    that are not printable (a newline would forge a second log line) are escaped."""
    out = []
    for c in _cut(value, limit):
        if c in '"\\':
            out.append("\\" + c)
        elif not c.isprintable():
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


class _Summarizer:
    def __init__(self, ns: str, repo: Repository):
        self.ns = ns
        self.repo = repo

    def keys_of(self, classname: str) -> set[str]:
        """Lower-case names of the key properties of `classname` (none if unknown)."""
        try:
            cls = self.repo.namespace(self.ns).get(classname)
        except CIMError:
            return set()
        if cls is None:
            return set()
        return {p.name.lower() for p in cls.properties.values()
                if p.qualifiers.get("Key") is not None and p.qualifiers["Key"].value}

    def value(self, name: str, value: Any, top: bool = True) -> str:
        if SECRET.search(name):
            return MASK
        if value is None:
            return "NULL"
        if isinstance(value, (list, tuple)):
            items = [self.value(name, v, top) for v in value[:MAX_ITEMS]]
            more = f", ...({len(value)} items)" if len(value) > MAX_ITEMS else ""
            return "[" + ", ".join(items) + more + "]"
        if isinstance(value, CIMInstance):
            return self.instance(value, everything=top)
        if isinstance(value, (CIMInstanceName, CIMClassName)):
            return path_text(value, self.ns)
        if isinstance(value, pywbem.CIMClass):
            return f"class {value.classname}"
        if isinstance(value, _Plain):
            return _safe(value)
        if isinstance(value, str):
            return self.text(value)
        return _safe(_cut(str(value)))

    def text(self, value: str) -> str:
        """A string; embedded CIM-XML or MOF is never shown, only its class."""
        for pattern, kind in ((_EMBEDDED_XML, "CIM-XML"), (_EMBEDDED_MOF, "MOF")):
            m = pattern.search(value) if kind == "CIM-XML" else pattern.match(value)
            if m:
                return f"{_safe(m.group(1))}{{embedded {kind}, {len(value)} chars}}"
        if value.lstrip().startswith("<"):
            return f"{{CIM-XML, {len(value)} chars}}"
        return _quoted(value)

    def instance(self, inst: CIMInstance, everything: bool) -> str:
        """NewInstance / ModifiedInstance: every property given; an embedded instance
        (a method parameter or a property value): its key properties and ElementName."""
        if everything:
            names = list(inst.properties)
        else:
            keys = self.keys_of(inst.classname) | {"elementname"}
            names = [n for n in inst.properties if n.lower() in keys]
        shown = [f"{_safe(n)}={self.value(n, inst.properties[n].value, False)}"
                 for n in names[:2 * MAX_ITEMS]]
        if len(names) > 2 * MAX_ITEMS:
            shown.append(f"...({len(names)} properties)")
        return f"{_safe(inst.classname)}{{{', '.join(shown)}}}"
