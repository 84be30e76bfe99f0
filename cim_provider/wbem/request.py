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


def parse_request(body: bytes, max_depth: int = 64) -> CIMRequest:
    """Parse a complete request body (DSP0201 SIMPLEREQ)."""
    try:
        tree = parse_tupletree(body, max_depth)
    except XMLRequestError as exc:
        raise RequestError(400, "request-not-well-formed", exc.reason) from None
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
    parser = TupleParser()
    try:
        if call[0][0] == "IMETHODCALL":
            name, cattrs, namespace, params = parser.parse_imethodcall(call[0])
            out: dict[str, Any] = {}
            seen: set[str] = set()
            for pname, value in params:
                _once(pname, seen)
                out[pname] = value
            return CIMRequest(mattrs["ID"], True, cattrs["NAME"], namespace, out)
        # pywbem 1.9 returns the target already parsed (CIMClassName / CIMInstanceName)
        # and each PARAMVALUE as (name, PARAMTYPE or None, parsed value).
        name, cattrs, target, params = parser.parse_methodcall(call[0])
        out = {}
        seen = set()
        for pname, ptype, value in params:
            _once(pname, seen)
            out[pname] = (ptype, value)
        return CIMRequest(mattrs["ID"], False, cattrs["NAME"], target.namespace or "",
                          out, target)
    except RequestError:
        raise
    except Exception as exc:  # pywbem's parse errors and anything odd in the tree
        raise RequestError(400, "request-not-valid", _short(str(exc))) from None


def _once(name: str, seen: set[str]) -> None:
    """Parameter names are case-insensitive and may appear once (a set: linear time)."""
    key = name.lower()
    if key in seen:
        raise RequestError(400, "request-not-valid", f"parameter {name[:64]!r} given twice")
    seen.add(key)


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
