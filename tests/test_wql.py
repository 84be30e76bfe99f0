"""WQL parser and evaluator: table-driven, no server needed."""
from __future__ import annotations

import pytest
from pywbem import CIMDateTime, CIMInstance, CIMProperty, Uint16

from cim_provider.wbem import wql


def system(name: str = "web", state: int = 2, **extra) -> CIMInstance:
    props = {"Name": name, "ElementName": name, "EnabledState": Uint16(state),
             "Description": CIMProperty("Description", None, type="string"),
             "Dedicated": [Uint16(0)], **extra}
    return CIMInstance("VIRT_ComputerSystem", properties=props)


def indication(cls: str = "VIRT_ComputerSystemModifiedIndication", source=None,
               previous=None) -> CIMInstance:
    inst = CIMInstance(cls)
    if source is not None:
        inst["SourceInstance"] = CIMProperty("SourceInstance", source, type="string",
                                             embedded_object="instance")
    if previous is not None:
        inst["PreviousInstance"] = CIMProperty("PreviousInstance", previous, type="string",
                                               embedded_object="instance")
    return inst


HIERARCHY = {"virt_computersystem": ["cim_computersystem", "cim_system",
                                      "cim_enabledlogicalelement", "cim_managedelement"],
             "virt_hostsystem": ["cim_computersystem", "cim_system", "cim_managedelement"]}


def is_subclass(name: str, base: str) -> bool:
    return name.lower() == base.lower() or base.lower() in HIERARCHY.get(name.lower(), [])


MOD = indication(source=system(state=9), previous=system(state=2))
HOST = indication(source=CIMInstance("VIRT_HostSystem", properties={"Name": "h"}))
NOW = CIMDateTime("20260101120000.000000+000")

# (description, query, instance, expected)
TESTCASES = [
    ("no WHERE selects everything", "SELECT * FROM VIRT_ComputerSystem", system(), True),
    ("integer equality", "SELECT * FROM X WHERE EnabledState = 2", system(), True),
    ("integer inequality", "SELECT * FROM X WHERE EnabledState <> 2", system(), False),
    ("!= is <>", "SELECT * FROM X WHERE EnabledState != 3", system(), True),
    ("less than", "SELECT * FROM X WHERE EnabledState < 3", system(), True),
    ("greater or equal", "SELECT * FROM X WHERE EnabledState >= 3", system(), False),
    ("literal on the left", "SELECT * FROM X WHERE 2 = EnabledState", system(), True),
    ("hex literal", "SELECT * FROM X WHERE EnabledState = 0x9", system(state=9), True),
    ("real literal", "SELECT * FROM X WHERE EnabledState > 1.5", system(), True),
    ("string in single quotes", "SELECT * FROM X WHERE Name = 'web'", system(), True),
    ("string in double quotes", 'SELECT * FROM X WHERE Name = "web"', system(), True),
    ("strings are case-sensitive", "SELECT * FROM X WHERE Name = 'WEB'", system(), False),
    ("doubled quote", "SELECT * FROM X WHERE Name = 'it''s'", system("it's"), True),
    ("backslash escape", r"SELECT * FROM X WHERE Name = 'it\'s'", system("it's"), True),
    ("string ordering", "SELECT * FROM X WHERE Name < 'x'", system(), True),
    ("keywords are case-insensitive", "select * from X where EnabledState = 2 and "
     "name = 'web'", system(), True),
    ("property names are case-insensitive", "SELECT * FROM X WHERE enabledstate = 2",
     system(), True),
    ("boolean literal", "SELECT * FROM X WHERE Flag = TRUE", system(Flag=True), True),
    ("boolean mismatch", "SELECT * FROM X WHERE Flag = FALSE", system(Flag=True), False),
    ("number vs string is unknown", "SELECT * FROM X WHERE EnabledState = '2'", system(),
     False),
    ("NOT of unknown is unknown", "SELECT * FROM X WHERE NOT EnabledState = '2'", system(),
     False),
    ("NULL property compares unknown", "SELECT * FROM X WHERE Description = 'x'", system(),
     False),
    ("NULL property <> is unknown too", "SELECT * FROM X WHERE Description <> 'x'", system(),
     False),
    ("= NULL is never true", "SELECT * FROM X WHERE Description = NULL", system(), False),
    ("IS NULL", "SELECT * FROM X WHERE Description IS NULL", system(), True),
    ("IS NOT NULL", "SELECT * FROM X WHERE Name IS NOT NULL", system(), True),
    ("missing property IS NULL", "SELECT * FROM X WHERE NoSuch IS NULL", system(), True),
    ("arrays do not compare", "SELECT * FROM X WHERE Dedicated = 0", system(), False),
    ("AND", "SELECT * FROM X WHERE EnabledState = 2 AND Name = 'db'", system(), False),
    ("OR", "SELECT * FROM X WHERE EnabledState = 3 OR Name = 'web'", system(), True),
    ("OR with unknown and true", "SELECT * FROM X WHERE Description = 'x' OR Name = 'web'",
     system(), True),
    ("NOT", "SELECT * FROM X WHERE NOT EnabledState = 3", system(), True),
    ("AND binds tighter than OR", "SELECT * FROM X WHERE Name = 'web' OR Name = 'x' AND "
     "EnabledState = 3", system(), True),
    ("parentheses", "SELECT * FROM X WHERE (Name = 'web' OR Name = 'x') AND "
     "EnabledState = 3", system(), False),
    ("nested NOT and parentheses", "SELECT * FROM X WHERE NOT (NOT (EnabledState = 2))",
     system(), True),
    ("datetime against a string", "SELECT * FROM X WHERE T = '20260101120000.000000+000'",
     system(T=NOW), True),
    ("datetime ordering", "SELECT * FROM X WHERE T > '20250101120000.000000+000'",
     system(T=NOW), True),
    ("SourceInstance ISA the class", "SELECT * FROM CIM_InstModification WHERE "
     "SourceInstance ISA VIRT_ComputerSystem", MOD, True),
    ("SourceInstance ISA a superclass", "SELECT * FROM CIM_InstIndication WHERE "
     "SourceInstance ISA CIM_ComputerSystem", MOD, True),
    ("SourceInstance ISA another class", "SELECT * FROM CIM_InstIndication WHERE "
     "SourceInstance ISA VIRT_ComputerSystem", HOST, False),
    ("ISA on a missing embedded instance", "SELECT * FROM CIM_InstIndication WHERE "
     "PreviousInstance ISA VIRT_ComputerSystem", HOST, False),
    ("SourceInstance property", "SELECT * FROM CIM_InstModification WHERE "
     "SourceInstance.EnabledState = 9", MOD, True),
    ("PreviousInstance property", "SELECT * FROM CIM_InstModification WHERE "
     "PreviousInstance.EnabledState = 2 AND SourceInstance.EnabledState <> "
     "PreviousInstance.EnabledState", MOD, True),
    ("property of a missing embedded instance is NULL", "SELECT * FROM CIM_InstIndication "
     "WHERE PreviousInstance.EnabledState IS NULL", HOST, True),
    ("the issue's example", "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA "
     "VIRT_ComputerSystem AND (SourceInstance.EnabledState = 9 OR "
     "SourceInstance.EnabledState = 3) AND NOT SourceInstance.Name = 'db'", MOD, True),
]


@pytest.mark.parametrize("desc, query, instance, expected", TESTCASES,
                         ids=[t[0] for t in TESTCASES])
def test_evaluate(desc, query, instance, expected):
    q = wql.parse(query)
    assert wql.matches(q, instance, is_subclass) is expected


# (description, query, unsupported?) : every one raises WQLError
ERRORS = [
    ("empty", "", False),
    ("blank", "   ", False),
    ("not a query", "DELETE FROM X", False),
    ("missing FROM", "SELECT *", False),
    ("missing class", "SELECT * FROM", False),
    ("typo in SELECT", "SELEC * FROM X", False),
    ("dangling AND", "SELECT * FROM X WHERE A = 1 AND", False),
    ("unbalanced parenthesis", "SELECT * FROM X WHERE (A = 1", False),
    ("stray parenthesis", "SELECT * FROM X WHERE A = 1)", False),
    ("unterminated string", "SELECT * FROM X WHERE A = 'x", False),
    ("missing operator", "SELECT * FROM X WHERE A 1", False),
    ("two literals with no operator", "SELECT * FROM X WHERE 1", False),
    ("IS without NULL", "SELECT * FROM X WHERE A IS 1", False),
    ("IS NULL on a literal", "SELECT * FROM X WHERE 1 IS NULL", False),
    ("ISA without class", "SELECT * FROM X WHERE SourceInstance ISA", False),
    ("odd character", "SELECT * FROM X WHERE A = #", False),
    ("trailing garbage", "SELECT * FROM X garbage", False),
    ("LIKE", "SELECT * FROM X WHERE Name LIKE 'a%'", True),
    ("joins", "SELECT * FROM X, Y", True),
    ("functions", "SELECT * FROM X WHERE UPPER(Name) = 'A'", True),
    ("qualified select list", "SELECT X.Name FROM X", True),
    ("IN", "SELECT * FROM X WHERE A IN (1, 2)", True),
]


@pytest.mark.parametrize("desc, query, unsupported", ERRORS, ids=[t[0] for t in ERRORS])
def test_rejected(desc, query, unsupported):
    with pytest.raises(wql.WQLError) as err:
        wql.parse(query)
    assert err.value.unsupported is unsupported
    assert err.value.message


def test_parse_shape():
    q = wql.parse("SELECT Name, EnabledState FROM VIRT_ComputerSystem WHERE "
                  "SourceInstance ISA CIM_System AND A.B = 1")
    assert q.select == ("Name", "EnabledState")
    assert q.classname == "VIRT_ComputerSystem"
    assert [str(p) for p in q.props()] == ["SourceInstance", "A.B"]
    assert q.isa_classes() == ["CIM_System"]
    assert wql.parse("SELECT * FROM X").select is None


# --- limits: nesting is bounded, flat chains are not recursion ---------------------------

W = "SELECT * FROM X WHERE "


def _chain(word: str, n: int, term: str) -> str:
    return f" {word} ".join([term] * n)


# (description, query, instance, expected): long chains and the deepest nesting allowed
DEEP_OK = [
    ("2000 ANDs, all true", W + _chain("AND", 2001, "EnabledState = 2"), system(), True),
    ("2000 ANDs, the last false", W + _chain("AND", 2000, "EnabledState = 2")
     + " AND Name = 'db'", system(), False),
    ("2000 ANDs, one unknown", W + "Description = 'x' AND "
     + _chain("AND", 2000, "EnabledState = 2"), system(), False),
    ("2000 ORs, the last true", W + _chain("OR", 2000, "EnabledState = 3")
     + " OR Name = 'web'", system(), True),
    ("2000 ORs, all false", W + _chain("OR", 2001, "EnabledState = 3"), system(), False),
    ("NOT of 2000 ORs with an unknown", W + "NOT (Description = 'x' OR "
     + _chain("OR", 2000, "EnabledState = 3") + ")", system(), False),
    ("AND and OR chains mixed", W + _chain("OR", 500, "(" + _chain(
        "AND", 4, "EnabledState = 3") + ")") + " OR (" + _chain("AND", 4, "Name = 'web'")
     + ")", system(), True),
    (f"{wql.MAX_DEPTH} parentheses", W + "(" * wql.MAX_DEPTH + "EnabledState = 2"
     + ")" * wql.MAX_DEPTH, system(), True),
    (f"{wql.MAX_DEPTH} NOTs", W + "NOT " * wql.MAX_DEPTH + "EnabledState = 2", system(),
     wql.MAX_DEPTH % 2 == 0),
    (f"{wql.MAX_DEPTH} levels of NOT and parentheses", W + "NOT (" * (wql.MAX_DEPTH // 2)
     + "EnabledState = 2" + ")" * (wql.MAX_DEPTH // 2), system(), True),
    (f"{wql.MAX_DEPTH} nested alternating ANDs and ORs", W
     + "".join(f"Name = 'x{i}' {'AND' if i % 2 else 'OR'} (" for i in range(wql.MAX_DEPTH))
     + "EnabledState = 2" + ")" * wql.MAX_DEPTH, system(), False),
    ("parentheses one after another", W + _chain("AND", 1000, "(EnabledState = 2)"),
     system(), True),
]


@pytest.mark.parametrize("desc, query, instance, expected", DEEP_OK,
                         ids=[t[0] for t in DEEP_OK])
def test_long_and_deep_queries_accepted(desc, query, instance, expected):
    q = wql.parse(query)
    assert wql.matches(q, instance, is_subclass) is expected


def test_chains_are_flat():
    q = wql.parse(W + _chain("AND", 2000, "A = 1") + " OR (B = 1 OR C = 1) OR D = 1")
    assert isinstance(q.where, wql.Or) and len(q.where.operands) == 4
    assert isinstance(q.where.operands[0], wql.And) and len(q.where.operands[0].operands) == 2000
    assert len(q.props()) == 2003
    assert [str(p) for p in q.props()[-3:]] == ["B", "C", "D"]


# (description, query): too deep, each a plain (not `unsupported`) WQLError saying so
TOO_DEEP = [
    ("NOT x 3000", W + "NOT " * 3000 + "A = 1"),
    ("'(' x 400", W + "(" * 400 + "A = 1" + ")" * 400),
    ("'(' x 400, unclosed", W + "(" * 400 + "A = 1"),
    ("'(' x 100000 (over the length limit)", W + "(" * 100000),
    (f"{wql.MAX_DEPTH + 1} parentheses", W + "(" * (wql.MAX_DEPTH + 1) + "A = 1"
     + ")" * (wql.MAX_DEPTH + 1)),
    (f"{wql.MAX_DEPTH + 1} NOTs", W + "NOT " * (wql.MAX_DEPTH + 1) + "A = 1"),
    ("NOT and parentheses together", W + "NOT (" * 60 + "A = 1" + ")" * 60),
    ("nested AND / OR", W + "A = 1 AND (B = 1 OR (" * 60 + "C = 1" + "))" * 60),
]


@pytest.mark.parametrize("desc, query", TOO_DEEP, ids=[t[0] for t in TOO_DEEP])
def test_too_deep_is_a_query_error(desc, query):
    with pytest.raises(wql.WQLError) as err:
        wql.parse(query)
    assert not err.value.unsupported
    assert "too deep" in err.value.message or "too long" in err.value.message


def test_recursion_error_in_evaluation_is_a_query_error():
    """A tree deeper than parse() builds (made by hand) is still a WQLError, not a crash."""
    node: wql.Node = wql.Compare("=", wql.Prop(("EnabledState",)), wql.Literal(2))
    for _ in range(5000):
        node = wql.Not(node)
    q = wql.Query("hand-built", None, "X", node)
    with pytest.raises(wql.WQLError):
        wql.matches(q, system())
    assert len(q.props()) == 1              # walking it does not recurse
