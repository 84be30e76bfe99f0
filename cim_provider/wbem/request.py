"""CIM-XML request body -> a request object; protocol problems -> RequestError.

This is the protocol layer: it knows DSP0200/DSP0201 framing and nothing of domains.
A RequestError carries the HTTP status and the CIMError header value (DSP0200 7.5),
so the HTTP front only has to copy them onto the response.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
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


class QuickGet:
    """A GetInstance whose body matched a known template (parse_quick): what the
    dispatcher's kept GetInstance plans need, without the pywbem path object. `shape`
    is everything in the request but its message ID and key values; `keys` are the
    key values (strings), in the order of the shape's key names. `build()` makes the
    ordinary CIMRequest, for when no plan answers."""

    __slots__ = ("msg_id", "method", "namespace", "shape", "keys", "_recipe", "_values")
    intrinsic = True

    def __init__(self, recipe: _Recipe, values: list[str]):
        self._recipe, self._values = recipe, values
        self.method, self.namespace = recipe.method, recipe.namespace
        msg = recipe.msg
        self.msg_id = values[msg] if isinstance(msg, int) else msg
        shape, slots = recipe.quick  # type: ignore[misc]  # reason: only made when set
        self.shape = shape
        self.keys = tuple(values[v] if cut else v for cut, v in slots)

    def build(self) -> CIMRequest:
        return self._recipe.build(self._values)


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


def parse_request(body: bytes | Sequence[bytes], max_depth: int = 64) -> CIMRequest:
    """Parse a complete request body (DSP0201 SIMPLEREQ): the bytes, or the chunks
    they arrived in (a large body is never joined: xmlparse feeds it a slice at a
    time)."""
    if not isinstance(body, (bytes, bytearray)):
        if sum(map(len, body)) > TEMPLATE_MAX:
            return parse_full(body, max_depth)
        body = b"".join(body)
    if len(body) <= TEMPLATE_MAX:
        req = _TEMPLATES.request(body, max_depth)
        if req is not None:
            return req
    return parse_full(body, max_depth)


def parse_quick(body: bytes, max_depth: int = 64) -> CIMRequest | QuickGet:
    """`parse_request` of one body, except that a GetInstance matching a known
    template whose path keys are all strings comes back as a QuickGet (the HTTP fast
    lane asks the dispatcher's kept plan first, docs/architecture.md "Data flow")."""
    if len(body) <= TEMPLATE_MAX:
        hit = _TEMPLATES.match(body, max_depth)
        if hit is not None:
            recipe, values = hit
            return QuickGet(recipe, values) if recipe.quick is not None \
                else recipe.build(values)
    return parse_full(body, max_depth)


def parse_full(body: bytes | Sequence[bytes], max_depth: int = 64) -> CIMRequest:
    """Parse a complete request body (bytes or chunks) with expat and pywbem's tuple
    parser."""
    try:
        tree = parse_tupletree(body, max_depth)
    except XMLRequestError as exc:
        raise RequestError(400, "request-not-well-formed", exc.reason) from None
    try:
        return _request(tree)
    finally:
        size = len(body) if isinstance(body, (bytes, bytearray)) else sum(map(len, body))
        if size > DISMANTLE_ABOVE:
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
            _free(params, seen)
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
        _free(params, seen)
        return CIMRequest(mattrs["ID"], False, cattrs["NAME"], target.namespace or "",
                          out, target, duplicate=duplicate)
    except RequestError:
        raise
    except Exception as exc:  # pywbem's parse errors and anything odd in the tree
        raise RequestError(400, "request-not-valid", _short(str(exc))) from None


def _free(params: list, seen: set[str]) -> None:
    """Empty a large request's temporaries one item at a time: dropped whole, 250,000
    of them are freed in one C-level cascade that holds the GIL (~80 ms), stalling the
    event loop while a worker thread parses (see _dismantle)."""
    if len(params) > _FREE_ABOVE:
        while params:
            params.pop()
        while seen:
            seen.pop()


_FREE_ABOVE = 1024


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


# ---- request templates -----------------------------------------------------------------
# A client sends the same few requests again and again, differing only in the MESSAGE
# ID and in string key values (GetInstance of one system after another). A request
# whose other bytes were seen before is not parsed again: its template (the body with
# those values cut out) maps to a recipe that puts the values where the full parse put
# them. The recipe is derived from the full parser itself, run once on the template
# with a sentinel in each cut-out place, so the request built is the one the full
# parse gives: a value is cut out only where the full parse takes the text as it is
# (an attribute, or a KEYVALUE of type string: no references, no CR, no control
# characters, valid UTF-8), and a template whose sentinels do not all come out as
# whole values is never used.

TEMPLATE_MAX = 8192          # bytes: larger bodies are always parsed in full
_MSG = b'<MESSAGE ID="'
_KEYVALUE = re.compile(rb'<KEYVALUE(?: VALUETYPE="string")?(?: TYPE="string")?>')
_BAD_ATTR = re.compile(rb'[<&\x00-\x1f]')              # not taken as it is by expat
_BAD_TEXT = re.compile(rb'[<&\x00-\x08\x0b-\x1f]')
_HOLE = b"\x00"              # marks a cut-out value in a template (never valid XML)
_MARK = "\ue000"             # sentinels: "\ue000<i>\ue001" (valid XML, private use)


def _sentinel(i: int) -> str:
    return f"{_MARK}{i}\ue001"


class _Recipe:
    """How to build the request of one template from its cut-out values."""

    __slots__ = ("msg", "method", "namespace", "params", "duplicate", "quick")

    def __init__(self, req: CIMRequest, slots: dict[str, int]):
        self.method, self.namespace, self.duplicate = req.method, req.namespace, req.duplicate
        self.msg: int | str = slots.get(req.msg_id, req.msg_id)
        if isinstance(self.msg, str) and _MARK in self.msg:
            raise ValueError("a cut-out value inside the MESSAGE ID")
        self.params: list[tuple[str, str, Any]] = []
        for name, value in req.params.items():
            if value is None or type(value) in (str, bool):
                if isinstance(value, str) and _MARK in value:
                    raise ValueError("a cut-out value inside a parameter")
                self.params.append((name, "const", value))
            elif type(value) is list and all(type(v) is str and _MARK not in v for v in value):
                self.params.append((name, "list", tuple(value)))
            elif type(value) is CIMClassName and _MARK not in repr(value):
                self.params.append((name, "class", value))
            elif type(value) is CIMInstanceName:
                keys: list[tuple[str, bool, Any]] = []
                for k, v in value.keybindings.items():
                    if type(v) is str and v in slots:
                        keys.append((k, True, slots.pop(v)))
                    elif isinstance(v, (str, bool, int)) and _MARK not in str(v):
                        keys.append((k, False, v))
                    else:
                        raise ValueError("a key the template cannot rebuild")
                if _MARK in f"{value.classname}{value.namespace}{value.host}{list(value.keybindings)}":
                    raise ValueError("a cut-out value in a path")
                self.params.append((name, "path", (value.classname, value.namespace,
                                                   value.host, tuple(keys))))
            else:
                raise ValueError("a parameter the template cannot rebuild")
        slots.pop(req.msg_id, None)
        if slots:
            raise ValueError("cut-out values the full parse did not take as they are")
        self.quick = self._quick_shape()

    def _quick_shape(self) -> tuple[tuple, tuple[tuple[bool, Any], ...]] | None:
        """(shape, key slots) of a GetInstance whose path keys are all strings (cut out,
        or constant), with no parameter given twice; None for anything else."""
        if self.method.lower() != "getinstance" or self.duplicate is not None:
            return None
        paths = [(name, data) for name, kind, data in self.params if kind == "path"]
        if len(paths) != 1 or paths[0][0].lower() != "instancename":
            return None
        classname, namespace, host, keys = paths[0][1]
        if not all(cut or type(v) is str for _k, cut, v in keys):
            return None
        others = tuple((name, kind, data) for name, kind, data in self.params
                       if kind != "path")
        if any(kind not in ("const", "list") for _n, kind, _d in others):
            return None
        shape = ("GetInstance", self.method, self.namespace, paths[0][0], classname,
                 namespace, host, tuple(k for k, _cut, _v in keys), others)
        return shape, tuple((cut, v) for _k, cut, v in keys)

    def build(self, values: list[str]) -> CIMRequest:
        params: dict[str, Any] = {}
        for name, kind, data in self.params:
            if kind == "const":
                params[name] = data
            elif kind == "list":
                params[name] = list(data)
            elif kind == "class":
                params[name] = data.copy()
            else:
                classname, namespace, host, keys = data
                params[name] = CIMInstanceName(
                    classname, {k: values[v] if cut else v for k, cut, v in keys},
                    namespace=namespace, host=host)
        msg = self.msg
        return CIMRequest(values[msg] if isinstance(msg, int) else msg, True, self.method,
                          self.namespace, params, duplicate=self.duplicate)


class _Templates:
    """Recipes by (template, max_depth); a template gets one after its second sighting."""

    MAX = 512

    def __init__(self) -> None:
        self._recipes: dict[tuple[bytes, int], _Recipe | None] = {}
        self._seen: dict[tuple[bytes, int], int] = {}

    def request(self, body: bytes, max_depth: int) -> CIMRequest | None:
        hit = self.match(body, max_depth)
        return None if hit is None else hit[0].build(hit[1])

    def match(self, body: bytes, max_depth: int) -> tuple[_Recipe, list[str]] | None:
        """(recipe, cut-out values) of a body whose template has a recipe."""
        if _HOLE in body or b"<IMETHODCALL " not in body:
            return None
        parts: list[bytes] = []
        values: list[str] = []
        pos = 0
        cuts: list[tuple[int, int, Any]] = []        # (value start, end, bad characters)
        at = body.find(_MSG)
        if at >= 0:
            start = at + len(_MSG)
            cuts.append((start, body.find(b'"', start), _BAD_ATTR))
        at = body.find(b"<KEYVALUE", max(at, 0))
        while at >= 0:
            m = _KEYVALUE.match(body, at)
            if m is not None:
                cuts.append((m.end(), body.find(b"</KEYVALUE>", m.end()), _BAD_TEXT))
            at = body.find(b"<KEYVALUE", at + 9)
        for start, end, bad in cuts:
            if end < 0:
                return None
            raw = body[start:end]
            if bad.search(raw) is not None:
                return None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
            if "\ufffe" in text or "\uffff" in text or "]]>" in text:
                return None
            parts += (body[pos:start], _HOLE)
            pos = end
            values.append(text)
        if not values:
            return None
        parts.append(body[pos:])
        key = (b"".join(parts), max_depth)
        recipe = self._recipes.get(key, False)
        if recipe is False:
            if self._seen.get(key) is None:
                if len(self._seen) >= self.MAX:
                    self._seen.clear()
                self._seen[key] = 1
                return None
            recipe = self._derive(key[0], len(values), max_depth)
            if len(self._recipes) >= self.MAX:
                self._recipes.clear()
            self._recipes[key] = recipe
        return None if recipe is None else (recipe, values)      # type: ignore[return-value]  # reason: False handled above

    @staticmethod
    def _derive(template: bytes, holes: int, max_depth: int) -> _Recipe | None:
        if _MARK.encode() in template:
            return None
        pieces = template.split(_HOLE)
        assert len(pieces) == holes + 1
        body = b"".join(p + (_sentinel(i).encode() if i < holes else b"")
                        for i, p in enumerate(pieces))
        try:
            req = parse_full(body, max_depth)
            if not req.intrinsic:
                return None
            return _Recipe(req, {_sentinel(i): i for i in range(holes)})
        except (RequestError, ValueError):
            return None


_TEMPLATES = _Templates()
