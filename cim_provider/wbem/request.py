"""CIM-XML request body -> a request object; protocol problems -> RequestError.

This is the protocol layer: it knows DSP0200/DSP0201 framing and nothing of domains.
A RequestError carries the HTTP status and the CIMError header value (DSP0200 7.5),
so the HTTP front only has to copy them onto the response.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pywbem import CIMClassName, CIMInstanceName
from pywbem._tupleparse import TupleParser  # the only module that uses it

from .xmlparse import XMLRequestError, parse_tupletree


class RequestError(Exception):
    """A request the server cannot process as CIM-XML; answered with an HTTP error."""

    def __init__(self, status: int, cim_error: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.cim_error = cim_error
        self.reason = reason


@dataclass
class CIMRequest:
    msg_id: str
    intrinsic: bool
    method: str                      # exactly as sent: the response echoes it
    namespace: str                   # from LOCALNAMESPACEPATH
    # intrinsic: name -> parsed value (str, list, CIMClassName, CIMInstanceName, ...)
    # extrinsic: name -> (PARAMTYPE or None, parsed value)
    params: dict[str, Any] = field(default_factory=dict)
    target: CIMInstanceName | CIMClassName | None = None   # extrinsic only
    # A parameter given twice (names are case-insensitive). The request is valid
    # CIM-XML, so this is not an HTTP error: DSP0200 makes it CIM_ERR_INVALID_PARAMETER,
    # which the dispatcher answers (the first value is kept here).
    duplicate: str | None = None


class _Parser(TupleParser):
    """pywbem's tuple parser, except for KEYVALUE text its VALUETYPE cannot read.

    The DTD does not constrain KEYVALUE text, so `<KEYVALUE VALUETYPE="numeric">abc`
    is valid CIM-XML naming no instance: the text is kept as a string and the
    dispatcher's key conversion answers CIM_ERR_NOT_FOUND (docs/architecture.md,
    "Errors"), instead of the whole request being refused as invalid.
    """

    def parse_keyvalue(self, tup_tree: Any) -> Any:
        try:
            return super().parse_keyvalue(tup_tree)
        except Exception:
            self.check_node(tup_tree, "KEYVALUE", (), ("VALUETYPE", "TYPE"), (),
                            allow_pcdata=True)
            attrs = tup_tree[1] or {}
            if attrs.get("VALUETYPE", "string") not in ("string", "boolean", "numeric") \
                    or attrs.get("TYPE"):
                raise       # an attribute the DTD does not allow: not valid CIM-XML
            return _UnreadableKey("".join(c for c in tup_tree[2] if isinstance(c, str)))


class _UnreadableKey(str):
    """KEYVALUE text that is not a value of its VALUETYPE; converts to no key type."""


# Above this many bytes the parsed tree is taken apart node by node once the request
# is built (see _dismantle).
DISMANTLE_ABOVE = 1 << 20


def parse_request(body: bytes, max_depth: int = 64) -> CIMRequest:
    """Parse a complete request body (DSP0201 SIMPLEREQ)."""
    try:
        tree = parse_tupletree(body, max_depth)
    except XMLRequestError as exc:
        raise RequestError(400, "request-not-well-formed", exc.reason) from None
    try:
        return _request(tree)
    finally:
        if len(body) > DISMANTLE_ABOVE:
            _dismantle(tree)


def _dismantle(tree: tuple) -> None:
    """Free a large tree a node at a time.

    Dropping the last reference to a tree of a million nodes frees it in one C-level
    cascade that holds the GIL throughout (100-250 ms for 16 MiB): the server's event
    loop thread stalls even though the parse ran in a worker. Emptying the child lists
    from Python lets the interpreter switch threads every few milliseconds meanwhile.
    """
    stack = [tree]
    while stack:
        kids = stack.pop()[2]
        while kids:
            kid = kids.pop()
            if isinstance(kid, tuple) and len(kid) > 2 and isinstance(kid[2], list):
                stack.append(kid)


def _request(tree: tuple) -> CIMRequest:
    if tree[0] != "CIM":
        raise RequestError(400, "request-not-valid", f"root element is {tree[0]!r}, not 'CIM'")
    attrs = tree[1]
    if not str(attrs.get("CIMVERSION", "")).startswith("2."):
        raise RequestError(501, "unsupported-cim-version", "CIMVERSION must be 2.x")
    if not str(attrs.get("DTDVERSION", "")).startswith("2."):
        raise RequestError(501, "unsupported-dtd-version", "DTDVERSION must be 2.x")
    message = _only_child(tree, "MESSAGE")
    mattrs = message[1]
    if "ID" not in mattrs:
        raise RequestError(400, "request-not-valid", "MESSAGE has no ID")
    if not str(mattrs.get("PROTOCOLVERSION", "")).startswith("1."):
        raise RequestError(501, "unsupported-protocol-version", "PROTOCOLVERSION must be 1.x")
    req = _elements(message)
    if len(req) != 1:
        raise RequestError(400, "request-not-valid", "MESSAGE must hold exactly one request")
    if req[0][0] == "MULTIREQ":
        raise RequestError(501, "multiple-requests-unsupported", "MULTIREQ is not supported")
    if req[0][0] != "SIMPLEREQ":
        raise RequestError(400, "request-not-valid", f"unexpected element {req[0][0]!r} in MESSAGE")
    call = _elements(req[0])
    if len(call) != 1 or call[0][0] not in ("IMETHODCALL", "METHODCALL"):
        raise RequestError(400, "request-not-valid",
                           "SIMPLEREQ must hold one IMETHODCALL or METHODCALL")
    parser = _Parser()
    try:
        if call[0][0] == "IMETHODCALL":
            name, cattrs, namespace, params = parser.parse_imethodcall(call[0])
            out: dict[str, Any] = {}
            seen: set[str] = set()
            duplicate = None
            for pname, value in params:
                if not _first(pname, seen):
                    duplicate = duplicate or pname
                    continue
                out[pname] = value
            return CIMRequest(mattrs["ID"], True, cattrs["NAME"], namespace, out,
                              duplicate=duplicate)
        # pywbem 1.9 returns the target already parsed (CIMClassName / CIMInstanceName)
        # and each PARAMVALUE as (name, PARAMTYPE or None, parsed value).
        name, cattrs, target, params = parser.parse_methodcall(call[0])
        out = {}
        seen = set()
        duplicate = None
        for pname, ptype, value in params:
            if not _first(pname, seen):
                duplicate = duplicate or pname
                continue
            out[pname] = (ptype, value)
        return CIMRequest(mattrs["ID"], False, cattrs["NAME"], target.namespace or "",
                          out, target, duplicate=duplicate)
    except RequestError:
        raise
    except Exception as exc:  # pywbem's parse errors and anything odd in the tree
        raise RequestError(400, "request-not-valid", _short(str(exc))) from None


def _first(name: str, seen: set[str]) -> bool:
    """Whether this is the first time a (case-insensitive) parameter name is given."""
    key = name.lower()
    if key in seen:
        return False
    seen.add(key)
    return True


def _elements(node: tuple) -> list[tuple]:
    return [c for c in node[2] if isinstance(c, tuple)]


def _only_child(node: tuple, name: str) -> tuple:
    kids = _elements(node)
    if len(kids) != 1 or kids[0][0] != name:
        raise RequestError(400, "request-not-valid", f"{node[0]} must hold exactly one {name}")
    return kids[0]


def _short(text: str, limit: int = 300) -> str:
    """Errors never echo large request content back."""
    text = text.splitlines()[0] if text else "invalid CIM-XML"
    return text if len(text) <= limit else text[:limit] + "..."
