"""ExecQuery and OpenQueryInstances: a WQL text checked against the namespace's classes,
then matched against every instance of the class (the operations, for the dispatcher's
table)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pywbem
from pywbem import CIMClass, CIMError, CIMInstance

from . import wql
from . import writer as w
from .context import Result
from .pullops import pull_result
from .render import Pacer
from .repository import Namespace
from .views import class_view, instance_view

if TYPE_CHECKING:
    from .dispatch import Dispatcher


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


async def query_instances(d: Dispatcher, ns: Namespace, query: wql.Query,
                          cls: CIMClass) -> list[CIMInstance]:
    allowed = None if query.select is None else {n.lower() for n in query.select}
    out = []
    pace = Pacer()
    for inst in await d._enumerate(ns, cls.classname):
        if wql.matches(query, inst, ns.is_subclass):
            out.append(instance_view(ns, inst, allowed, False))
        await pace.tick()
    return out


async def op_ExecQuery(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    query, cls = check_query(ns, p["QueryLanguage"], p["Query"])
    return Result([w.value_objectwithpath_xml(inst, None, d.host)
                   for inst in await query_instances(d, ns, query, cls)])


async def op_OpenQueryInstances(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    # DSP0200 OpenQueryInstances: the result is pulled with PullInstances, which
    # returns INSTANCE elements without paths.
    if p["ContinueOnError"]:
        raise CIMError(pywbem.CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED,
                       "ContinueOnError is not supported")
    timeout = d.pulls.check_timeout(p["OperationTimeout"])
    query, cls = check_query(ns, p["FilterQueryLanguage"], p["FilterQuery"])
    items = [w.instance_xml(inst) for inst in await query_instances(d, ns, query, cls)]
    ctx_id, chunk, eos = d.pulls.open(ns.name, "query", items, p["MaxObjectCount"],
                                      timeout, ctx.client)
    res = pull_result(chunk, eos, ctx_id)
    if p["ReturnQueryResultClass"]:
        view = class_view(cls, False, None if query.select is None else list(query.select))
        assert res.params is not None        # pull_result always sets them
        res.params.insert(0, w.paramvalue_class_xml("QueryResultClass", view))
    return res


async def op_PullInstances(d: Dispatcher, ns: Namespace, p: dict, ctx) -> Result:
    chunk, eos, ctx_id = d.pulls.pull(ns.name, "query", p["EnumerationContext"],
                                      p["MaxObjectCount"], ctx.client)
    return pull_result(chunk, eos, ctx_id)
