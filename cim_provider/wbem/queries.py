"""ExecQuery and OpenQueryInstances: a WQL text checked against the namespace's classes."""
from __future__ import annotations

import pywbem
from pywbem import CIMClass, CIMError

from . import wql
from .repository import Namespace


def check_query(ns: Namespace, language: str, text: str) -> tuple[wql.Query, CIMClass]:
    """Parse and check a query against the namespace's classes.

    DSP0200 ExecQuery: CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED when the language is not
    recognized, CIM_ERR_INVALID_QUERY when the query is not valid in it (we also use
    it for the WQL features we do not offer, and for unknown classes or properties)."""
    if language.strip().upper() != wql.LANGUAGE:
        raise CIMError(pywbem.CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED,
                       f"query language {language[:64]!r} is not supported; use WQL")
    try:
        query = wql.parse(text)
    except wql.WQLError as exc:
        raise CIMError(pywbem.CIM_ERR_INVALID_QUERY, exc.message) from None
    cls = ns.get(query.classname)
    if cls is None:
        raise CIMError(pywbem.CIM_ERR_INVALID_QUERY,
                       f"class {query.classname[:128]!r} does not exist in {ns.name}")
    for name in list(query.select or ()) + [pr.path[0] for pr in query.props()]:
        if name not in cls.properties:
            raise CIMError(pywbem.CIM_ERR_INVALID_QUERY,
                           f"{cls.classname} has no property {name[:64]!r}")
    for name in query.isa_classes():
        if ns.get(name) is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_QUERY,
                           f"class {name[:128]!r} does not exist in {ns.name}")
    return query, cls
