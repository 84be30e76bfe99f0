"""WQL, the subset a WBEM console actually sends: parse once, evaluate many times.

Supported: `SELECT * | prop[, prop...] FROM <class> [WHERE <condition>]`, where a
condition combines with AND / OR / NOT and parentheses:
- comparisons `=`, `<>` (also `!=`), `<`, `>`, `<=`, `>=` between property paths
  (`EnabledState`, `SourceInstance.EnabledState`: each dot steps into an embedded
  instance) and literals (strings in single or double quotes, integers, reals,
  TRUE / FALSE, NULL);
- `<path> IS [NOT] NULL`;
- `<path> ISA <class>` (the embedded instance is of that class or a subclass).

Everything else (LIKE, functions, joins, `prop.*`, ...) is refused with a WQLError
whose `unsupported` flag says it is a feature we do not offer rather than bad syntax.

Limits (a WQLError when exceeded): a query is at most MAX_QUERY characters, and
parentheses and NOT nest at most MAX_DEPTH levels deep. Chains of AND / OR are flat
(n-ary nodes, evaluated in a loop), so they are limited only by the length.

Evaluation uses SQL's three-valued logic: a comparison involving NULL, or values of
types that cannot be compared, is unknown, and a WHERE clause selects an object only
when it is true. This module is CIM-XML free and used by dispatch (ExecQuery,
OpenQueryInstances) and by the indication filters.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Union

from pywbem import CIMDateTime, CIMInstance

LANGUAGE = "WQL"


class WQLError(ValueError):
    """A query we cannot run: bad syntax, or (`unsupported`) a feature we lack."""

    def __init__(self, message: str, unsupported: bool = False):
        super().__init__(message)
        self.message = message
        self.unsupported = unsupported


# --- syntax tree ----------------------------------------------------------------------

@dataclass(frozen=True)
class Prop:
    path: tuple[str, ...]                  # ("SourceInstance", "EnabledState")

    def __str__(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Literal:
    value: Any                             # str, int, float, bool or None (NULL)


Operand = Union[Prop, Literal]


@dataclass(frozen=True)
class Compare:
    op: str                                # = <> < > <= >=
    left: Operand
    right: Operand


@dataclass(frozen=True)
class IsNull:
    prop: Prop
    negated: bool


@dataclass(frozen=True)
class Isa:
    prop: Prop
    classname: str


@dataclass(frozen=True)
class And:
    operands: tuple["Node", ...]           # two or more; a chain is one node, not a spine


@dataclass(frozen=True)
class Or:
    operands: tuple["Node", ...]


@dataclass(frozen=True)
class Not:
    operand: "Node"


Node = Union[Compare, IsNull, Isa, And, Or, Not]


@dataclass(frozen=True)
class Query:
    """A parsed query; `select` is None for `*`."""
    text: str
    select: tuple[str, ...] | None
    classname: str
    where: Node | None

    def leaves(self) -> Iterator[Compare | IsNull | Isa]:
        """The comparisons, IS NULL and ISA tests of the WHERE clause, left to right
        (walked with a stack, not recursion)."""
        stack: list[Node] = [] if self.where is None else [self.where]
        while stack:
            n = stack.pop()
            if isinstance(n, (And, Or)):
                stack.extend(reversed(n.operands))
            elif isinstance(n, Not):
                stack.append(n.operand)
            else:
                yield n

    def props(self) -> list[Prop]:
        """Every property path the WHERE clause reads (for validation against a class)."""
        out: list[Prop] = []
        for n in self.leaves():
            if isinstance(n, Compare):
                out.extend(o for o in (n.left, n.right) if isinstance(o, Prop))
            else:
                out.append(n.prop)
        return out

    def isa_classes(self) -> list[str]:
        return [n.classname for n in self.leaves() if isinstance(n, Isa)]


# --- tokenizer ----------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?))
  | (?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
  | (?P<op><>|!=|<=|>=|=|<|>)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[(),.*])
""", re.X)

_KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IS", "NULL", "ISA", "TRUE",
             "FALSE"}
# Words of full WQL/CQL we recognise only to say clearly that they are not offered.
_UNSUPPORTED_WORDS = {"LIKE", "BETWEEN", "IN", "JOIN", "ORDER", "GROUP", "HAVING", "DISTINCT",
                      "ANY", "EVERY", "SATISFIES", "AS", "UNION", "FIRST", "LIMIT"}
MAX_QUERY = 64 * 1024
MAX_DEPTH = 100        # levels of parentheses and NOT, together


@dataclass(frozen=True)
class _Tok:
    kind: str          # num str op ident punct kw end
    value: Any
    pos: int


def _unquote(s: str) -> str:
    q, body = s[0], s[1:-1]
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        elif c == q and i + 1 < len(body) and body[i + 1] == q:
            out.append(q)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _number(s: str) -> int | float:
    t = s.lstrip("+")
    neg = t.startswith("-")
    body = t.lstrip("-")
    if body[:2].lower() == "0x":
        v: int | float = int(body, 16)
    elif any(c in body for c in ".eE"):
        v = float(body)
    else:
        v = int(body)
    return -v if neg else v


def _tokens(text: str) -> Iterator[_Tok]:
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise WQLError(f"unexpected character {text[pos]!r} at offset {pos}")
        kind = m.lastgroup
        raw = m.group()
        if kind == "num":
            yield _Tok("num", _number(raw), pos)
        elif kind == "str":
            yield _Tok("str", _unquote(raw), pos)
        elif kind == "ident":
            up = raw.upper()
            yield _Tok("kw", up, pos) if up in _KEYWORDS else _Tok("ident", raw, pos)
        elif kind in ("op", "punct"):
            yield _Tok(kind, "<>" if raw == "!=" else raw, pos)
        pos = m.end()
    yield _Tok("end", None, pos)


# --- parser (recursive descent) --------------------------------------------------------

def _extend(items: list[Node], node: Node, kind: type[And] | type[Or]) -> None:
    items.extend(node.operands if isinstance(node, kind) else (node,))


class _Parser:
    def __init__(self, text: str):
        self.toks = list(_tokens(text))
        self.i = 0
        self.depth = 0

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise WQLError(f"the condition nests too deeply (more than {MAX_DEPTH} levels "
                           f"of parentheses and NOT, at offset {self.cur.pos})")

    @property
    def cur(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def is_kw(self, word: str) -> bool:
        return self.cur.kind == "kw" and self.cur.value == word

    def expect_kw(self, word: str) -> None:
        if not self.is_kw(word):
            self.fail(f"expected {word}")
        self.take()

    def fail(self, what: str) -> None:
        t = self.cur
        if t.kind == "ident" and t.value.upper() in _UNSUPPORTED_WORDS:
            raise WQLError(f"{t.value.upper()} is not supported (offset {t.pos})", True)
        got = "end of query" if t.kind == "end" else repr(str(t.value))
        raise WQLError(f"{what} at offset {t.pos}, found {got}")

    def ident(self, what: str) -> str:
        if self.cur.kind != "ident":
            self.fail(f"expected {what}")
        return self.take().value

    def query(self, text: str) -> Query:
        self.expect_kw("SELECT")
        select: tuple[str, ...] | None
        if self.cur.kind == "punct" and self.cur.value == "*":
            self.take()
            select = None
        else:
            names = [self.select_item()]
            while self.cur.kind == "punct" and self.cur.value == ",":
                self.take()
                names.append(self.select_item())
            select = tuple(names)
        self.expect_kw("FROM")
        classname = self.ident("a class name after FROM")
        if self.cur.kind == "punct" and self.cur.value == ",":
            raise WQLError("queries over more than one class (joins) are not supported", True)
        where = None
        if self.is_kw("WHERE"):
            self.take()
            where = self.or_expr()
        if self.cur.kind != "end":
            self.fail("unexpected text after the query")
        return Query(text, select, classname, where)

    def select_item(self) -> str:
        name = self.ident("a property name or * after SELECT")
        if self.cur.kind == "punct" and self.cur.value == ".":
            raise WQLError("qualified names in the SELECT list are not supported", True)
        return name

    # AND / OR chains become one n-ary node each (built in a loop, so a long flat chain
    # costs no recursion); a parenthesised chain of the same kind is merged in (AND and
    # OR are associative, in three-valued logic too).

    def or_expr(self) -> Node:
        items: list[Node] = []
        while True:
            _extend(items, self.and_expr(), Or)
            if not self.is_kw("OR"):
                return items[0] if len(items) == 1 else Or(tuple(items))
            self.take()

    def and_expr(self) -> Node:
        items: list[Node] = []
        while True:
            _extend(items, self.not_expr(), And)
            if not self.is_kw("AND"):
                return items[0] if len(items) == 1 else And(tuple(items))
            self.take()

    def not_expr(self) -> Node:
        nots = 0
        while self.is_kw("NOT"):
            self.take()
            self.enter()
            nots += 1
        node = self.primary()
        for _ in range(nots):
            node = Not(node)
        self.depth -= nots
        return node

    def primary(self) -> Node:
        if self.cur.kind == "punct" and self.cur.value == "(":
            self.take()
            self.enter()
            node = self.or_expr()
            if not (self.cur.kind == "punct" and self.cur.value == ")"):
                self.fail("expected )")
            self.take()
            self.depth -= 1
            return node
        left = self.operand()
        if self.is_kw("IS"):
            self.take()
            negated = False
            if self.is_kw("NOT"):
                self.take()
                negated = True
            self.expect_kw("NULL")
            return IsNull(self.as_prop(left, "IS NULL"), negated)
        if self.is_kw("ISA"):
            self.take()
            return Isa(self.as_prop(left, "ISA"), self.ident("a class name after ISA"))
        if self.cur.kind != "op":
            self.fail("expected a comparison operator, IS or ISA")
        op = self.take().value
        right = self.operand()
        return Compare(op, left, right)

    def as_prop(self, operand: Operand, what: str) -> Prop:
        if not isinstance(operand, Prop):
            raise WQLError(f"{what} needs a property on its left")
        return operand

    def operand(self) -> Operand:
        t = self.cur
        if t.kind in ("num", "str"):
            self.take()
            return Literal(t.value)
        if t.kind == "kw" and t.value in ("TRUE", "FALSE", "NULL"):
            self.take()
            return Literal(None if t.value == "NULL" else t.value == "TRUE")
        if t.kind == "ident":
            path = [self.take().value]
            if self.cur.kind == "punct" and self.cur.value == "(":
                raise WQLError(f"functions ({path[0]}(...)) are not supported", True)
            while self.cur.kind == "punct" and self.cur.value == ".":
                self.take()
                if self.cur.kind == "punct" and self.cur.value == "*":
                    raise WQLError("'.*' is not supported", True)
                path.append(self.ident("a property name after '.'"))
            return Prop(tuple(path))
        self.fail("expected a property name or a literal")
        raise AssertionError("unreachable")


def parse(text: str) -> Query:
    """Parse a WQL query; WQLError says what is wrong or not supported."""
    if not isinstance(text, str) or not text.strip():
        raise WQLError("the query is empty")
    if len(text) > MAX_QUERY:
        raise WQLError(f"the query is too long (more than {MAX_QUERY} characters)")
    try:
        return _Parser(text).query(text)
    except RecursionError:      # MAX_DEPTH should prevent it; never an internal error
        raise WQLError("the query nests too deeply") from None


# --- evaluation ---------------------------------------------------------------------

IsSubclass = Callable[[str, str], bool]


def _get(obj: Any, name: str) -> Any:
    if not isinstance(obj, CIMInstance):
        return None
    prop = obj.properties.get(name)      # NocaseDict: case-insensitive
    return None if prop is None else prop.value


def resolve(prop: Prop, inst: CIMInstance) -> Any:
    """The value a property path names in `inst`; None when any step is missing."""
    value: Any = inst
    for name in prop.path:
        value = _get(value, name)
        if value is None:
            return None
    return value


def _value(operand: Operand, inst: CIMInstance) -> Any:
    return operand.value if isinstance(operand, Literal) else resolve(operand, inst)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _comparable(a: Any, b: Any) -> tuple[Any, Any] | None:
    """Both values in one comparable form, or None when their types do not compare."""
    if isinstance(a, bool) or isinstance(b, bool):
        return (a, b) if isinstance(a, bool) and isinstance(b, bool) else None
    if _is_number(a) and _is_number(b):
        return a, b
    if isinstance(a, CIMDateTime) or isinstance(b, CIMDateTime):
        try:
            a = a if isinstance(a, CIMDateTime) else CIMDateTime(a)
            b = b if isinstance(b, CIMDateTime) else CIMDateTime(b)
        except (TypeError, ValueError):
            return None
        if a.is_interval != b.is_interval:
            return None
        return ((a.timedelta, b.timedelta) if a.is_interval else (a.datetime, b.datetime))
    if isinstance(a, str) and isinstance(b, str):
        return str(a), str(b)
    return None


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "<>": lambda a, b: a != b, "<": lambda a, b: a < b,
    ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
}


def _truth(node: Node, inst: CIMInstance, is_subclass: IsSubclass | None) -> bool | None:
    if isinstance(node, (And, Or)):
        # Kleene logic over the chain, in a loop: AND is False as soon as one operand is
        # False, else unknown if any is unknown; OR the same with True.
        decisive = isinstance(node, Or)
        unknown = False
        for operand in node.operands:
            v = _truth(operand, inst, is_subclass)
            if v is decisive:
                return decisive
            unknown = unknown or v is None
        return None if unknown else not decisive
    if isinstance(node, Not):
        v = _truth(node.operand, inst, is_subclass)
        return None if v is None else not v
    if isinstance(node, IsNull):
        return (resolve(node.prop, inst) is None) != node.negated
    if isinstance(node, Isa):
        v = resolve(node.prop, inst)
        if not isinstance(v, CIMInstance):
            return None
        if is_subclass is None:
            return v.classname.lower() == node.classname.lower()
        return is_subclass(v.classname, node.classname)
    a, b = _value(node.left, inst), _value(node.right, inst)
    if a is None or b is None or isinstance(a, list) or isinstance(b, list):
        return None
    pair = _comparable(a, b)
    if pair is None:
        return None
    try:
        return _OPS[node.op](*pair)
    except TypeError:
        return None


def matches(query: Query, inst: CIMInstance, is_subclass: IsSubclass | None = None) -> bool:
    """True if `inst` satisfies the WHERE clause (the FROM class is the caller's job)."""
    if query.where is None:
        return True
    try:
        return _truth(query.where, inst, is_subclass) is True
    except RecursionError:      # only for a hand-built tree deeper than parse() allows
        raise WQLError("the query nests too deeply") from None
