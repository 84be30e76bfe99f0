"""Request XML to pywbem's tuple tree, in linear time and without DTDs.

pywbem's own SAX handler appends text with `+=`, which is quadratic on a request made
of many entity references, and expat would happily expand entities declared in a
DOCTYPE. CIM-XML needs neither DTDs nor entities beyond the five predefined ones, so
any DOCTYPE is refused before parsing, and the tree is built with lists joined once.

The tree has pywbem's shape: (name, attrs, children) with text as str children.
"""
from __future__ import annotations

import xml.parsers.expat
from collections.abc import Iterable
from typing import NoReturn

DEFAULT_MAX_DEPTH = 64
# Bytes handed to expat (and searched for a DOCTYPE) per call. Each such call is C
# code holding the GIL: on a 16 MiB body in one piece the two searches alone held it
# for tens of milliseconds while the event loop waited (issue 16, loop stall).
SLICE = 256 * 1024
_REFUSED = (b"<!DOCTYPE", b"<!ENTITY")
_CARRY = max(len(n) for n in _REFUSED) - 1      # a declaration split between slices


class XMLRequestError(ValueError):
    """The request body is not acceptable XML; `reason` is short and safe to echo."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _refuse_dtd(*_args: object) -> NoReturn:
    raise XMLRequestError("DOCTYPE and entity declarations are not allowed")


def _slices(body: bytes | Iterable[bytes]) -> Iterable[bytes]:
    """The body in pieces of at most SLICE bytes (`body`: the bytes, or the chunks
    they arrived in); a body of one small piece is not copied."""
    for chunk in [body] if isinstance(body, (bytes, bytearray)) else body:
        if len(chunk) <= SLICE:
            yield chunk
            continue
        for start in range(0, len(chunk), SLICE):
            yield chunk[start:start + SLICE]


def parse_tupletree(body: bytes | Iterable[bytes],
                    max_depth: int = DEFAULT_MAX_DEPTH) -> tuple:
    """Parse a CIM-XML request body (bytes, or the chunks it arrived in) into a tuple
    tree, a slice at a time."""
    parser = xml.parsers.expat.ParserCreate()
    parser.buffer_text = True
    stack: list[tuple] = []
    texts: list[list[str]] = []
    root: list[tuple] = []

    def start(name: str, attrs: dict) -> None:
        if len(stack) >= max_depth:
            raise XMLRequestError(f"XML nesting deeper than {max_depth} levels")
        node: tuple[str, dict, list] = (name, attrs, [])
        if stack:
            _flush(stack[-1], texts[-1])
            stack[-1][2].append(node)
        else:
            root.append(node)
        stack.append(node)
        texts.append([])

    def end(_name: str) -> None:
        node = stack.pop()
        _flush(node, texts.pop())

    def chars(data: str) -> None:
        if texts:
            texts[-1].append(data)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_dtd
    try:
        tail = b""
        for piece in _slices(body):
            # Cheap pre-check: anything with a DOCTYPE is refused before expat sees it.
            seen = tail + piece[:_CARRY]
            if any(n in seen or n in piece for n in _REFUSED):
                _refuse_dtd()
            tail = piece[-_CARRY:]
            parser.Parse(piece, False)
        parser.Parse(b"", True)
    except xml.parsers.expat.ExpatError as exc:
        raise XMLRequestError(f"malformed XML: {xml.parsers.expat.errors.messages.get(exc.code, 'error')}"
                              f" at line {exc.lineno}, column {exc.offset}") from None
    except RecursionError:
        raise XMLRequestError("XML nesting too deep") from None
    except LookupError:      # encoding="maybe" in the XML declaration (found by fuzzing)
        raise XMLRequestError("unknown encoding in the XML declaration") from None
    if not root:
        raise XMLRequestError("no root element")
    return root[0]


def _flush(node: tuple, pending: list[str]) -> None:
    """Move the text gathered since the last child into the node, as one string."""
    if pending:
        node[2].append("".join(pending))
        pending.clear()
