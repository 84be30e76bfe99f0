"""The project's CIM-XML writer, read back with pywbem's TupleParser.

Every case is written with cim_provider.wbem.writer, turned into a tuple tree by our
parser (cim_provider.wbem.xmlparse) and by pywbem's own SAX parser, parsed with
pywbem's TupleParser and compared with the original object (pywbem equality).
No case may contain a self-closing tag: sblim wbemcli cannot read them.
"""
from __future__ import annotations

import math

import pytest
from pywbem import (CIMClass, CIMClassName, CIMDateTime, CIMInstance, CIMInstanceName,
                    CIMMethod, CIMParameter, CIMProperty, CIMQualifier,
                    CIMQualifierDeclaration, Char16, Real32, Real64, Sint8, Sint16,
                    Sint32, Sint64, Uint8, Uint16, Uint32, Uint64)
from pywbem._tupleparse import TupleParser
from pywbem._tupletree import xml_to_tupletree_sax

from cim_provider.wbem import writer as w
from cim_provider.wbem.xmlparse import parse_tupletree


def P(name, value, type_=None, **kw):
    """A property as pywbem's parser produces it (propagated defaults to False)."""
    kw.setdefault("propagated", False)
    return CIMProperty(name, value, type=type_, **kw)


def Q(name, value, type_=None, **kw):
    """A qualifier with the flavors pywbem's parser fills in when absent."""
    kw.setdefault("propagated", False)
    kw.setdefault("overridable", True)
    kw.setdefault("tosubclass", True)
    kw.setdefault("toinstance", False)
    kw.setdefault("translatable", False)
    return CIMQualifier(name, value, type=type_, **kw)


NAN = float("nan")
INF = float("inf")
DT_TS = CIMDateTime("20241231235959.999999-720")
DT_TS2 = CIMDateTime("19700101000000.000000+000")
DT_IV = CIMDateTime("12345678224455.654321:000")
DT_IV0 = CIMDateTime("00000000000000.000000:000")
NASTY = "a<b>c&d\"e'f \u00e9\u00df\u4e2d\U0001F600 ]]> &amp; /> <!-- x -->"
HOST_REF = CIMInstanceName("VIRT_HostSystem", {"CreationClassName": "VIRT_HostSystem",
                                               "Name": "h&<>\"'"})
LOCAL_REF = CIMInstanceName("VIRT_HostSystem", {"CreationClassName": "VIRT_HostSystem",
                                                "Name": "h1"}, namespace="root/virt")
FULL_REF = CIMInstanceName("VIRT_HostSystem", {"CreationClassName": "VIRT_HostSystem",
                                               "Name": "h2"}, namespace="root/virt",
                           host="server.example.com:5989")

EMBEDDED = CIMInstance("CIM_ManagedElement", properties=[
    P("ElementName", "inner <b>&amp;</b> \"quoted\" 'x' \u00e9"),
    P("Generation", Uint64(2**64 - 1)),
    P("Nothing", None, "uint16"),
    P("Arr", ["a", None, "c"], "string"),
])
EMBEDDED2 = CIMInstance("CIM_Nested", properties=[
    P("Inner", EMBEDDED, "string", embedded_object="instance"),
    P("Text", "level2 & <stuff>"),
])


# --- properties: every type, scalar / array / NULL ---------------------------------

SCALARS = [
    ("uint8 min", Uint8(0)), ("uint8 max", Uint8(255)),
    ("uint16 max", Uint16(65535)), ("uint32 max", Uint32(4294967295)),
    ("uint64 max", Uint64(18446744073709551615)),
    ("sint8 min", Sint8(-128)), ("sint8 max", Sint8(127)),
    ("sint16 min", Sint16(-32768)), ("sint32 min", Sint32(-2147483648)),
    ("sint64 min", Sint64(-9223372036854775808)), ("sint64 max", Sint64(9223372036854775807)),
    ("real32", Real32(1.5)), ("real32 small", Real32(-3.25e-10)),
    ("real32 INF", Real32(INF)), ("real32 -INF", Real32(-INF)),
    ("real64", Real64(3.141592653589793)), ("real64 tiny", Real64(5e-324)),
    ("real64 big", Real64(1.7976931348623157e308)),
    ("real64 INF", Real64(INF)), ("real64 -INF", Real64(-INF)),
    ("real64 negative zero", Real64(-0.0)),
    ("boolean true", True), ("boolean false", False),
    ("string", "hello"), ("empty string", ""), ("blank string", "   "),
    ("string escaping", NASTY),
    ("string newlines and CR", "line1\nline2\r\nline3\rline4\ttab"),
    ("string leading/trailing newline", "\nx\n"),
    ("char16", Char16("x")), ("char16 escaped", Char16("<")), ("char16 amp", Char16("&")),
    ("char16 non-ASCII", Char16("\u00e9")),
    ("datetime timestamp", DT_TS), ("datetime epoch", DT_TS2),
    ("datetime interval", DT_IV), ("datetime zero interval", DT_IV0),
]

TESTCASES: list[tuple] = []

for desc, value in SCALARS:
    TESTCASES.append((f"property {desc}", P("P", value), "PROPERTY"))
    TESTCASES.append((f"array of {desc}", P("A", [value, value]), "PROPERTY.ARRAY"))

for t in ("uint8", "uint16", "uint32", "uint64", "sint8", "sint16", "sint32", "sint64",
          "real32", "real64", "boolean", "string", "char16", "datetime"):
    TESTCASES.append((f"NULL {t}", P("N", None, t), "PROPERTY"))
    TESTCASES.append((f"NULL array of {t}", P("NA", None, t, is_array=True), "PROPERTY.ARRAY"))
    TESTCASES.append((f"empty array of {t}", P("EA", [], t), "PROPERTY.ARRAY"))

TESTCASES += [
    ("array with NULL elements (string)", P("A", ["a", None, "", None], "string"),
     "PROPERTY.ARRAY"),
    ("array with only NULL", P("A", [None], "string"), "PROPERTY.ARRAY"),
    ("array of mixed datetimes", P("A", [DT_TS, DT_IV], "datetime"), "PROPERTY.ARRAY"),
    ("array of reals with NaN-free specials", P("A", [Real64(-INF), Real64(0.1), Real64(INF)]),
     "PROPERTY.ARRAY"),
    ("array with ARRAYSIZE", P("A", [Uint8(1), Uint8(2)], array_size=2), "PROPERTY.ARRAY"),
    ("reference INSTANCENAME", P("R", HOST_REF, "reference", reference_class="CIM_System"),
     "PROPERTY.REFERENCE"),
    ("reference LOCALINSTANCEPATH", P("R", LOCAL_REF, "reference", reference_class="CIM_System"),
     "PROPERTY.REFERENCE"),
    ("reference INSTANCEPATH", P("R", FULL_REF, "reference"), "PROPERTY.REFERENCE"),
    ("reference NULL", P("R", None, "reference", reference_class="CIM_System"),
     "PROPERTY.REFERENCE"),
    ("reference to a reference key",
     P("R", CIMInstanceName("VIRT_HostedDependency", {"Antecedent": LOCAL_REF,
                                                      "Dependent": FULL_REF},
                            namespace="root/virt"), "reference"), "PROPERTY.REFERENCE"),
    ("embedded instance", P("E", EMBEDDED, "string", embedded_object="instance"), "PROPERTY"),
    ("embedded instance nested twice", P("E", EMBEDDED2, "string", embedded_object="instance"),
     "PROPERTY"),
    ("embedded instance NULL", P("E", None, "string", embedded_object="instance"), "PROPERTY"),
    ("array of embedded instances",
     P("E", [EMBEDDED, EMBEDDED2], "string", embedded_object="instance"), "PROPERTY.ARRAY"),
    ("embedded object (class)",
     P("E", CIMClass("CIM_Foo", properties=[P("X", None, "uint8",
                                              class_origin="CIM_Foo")]),
       "string", embedded_object="object"), "PROPERTY"),
    ("property with qualifiers",
     P("Q", Uint16(3), qualifiers=[Q("Description", "a <desc> & 'more'", "string"),
                                   Q("ValueMap", ["0", "1", ".."], "string"),
                                   Q("Key", True, "boolean", overridable=False)]),
     "PROPERTY"),
    ("property with class origin", P("C", "x", class_origin="CIM_ManagedElement",
                                     propagated=True), "PROPERTY"),
]

# --- instances ------------------------------------------------------------------------

ALL_PROPS = [P(f"S{i}", v) for i, (_d, v) in enumerate(SCALARS) if not
             (isinstance(v, float) and math.isnan(v))]
TESTCASES += [
    ("instance with every type", CIMInstance("VIRT_Test", properties=ALL_PROPS), "INSTANCE"),
    ("instance with NULLs and arrays", CIMInstance("VIRT_Test", properties=[
        P("N", None, "uint64"), P("NA", None, "string", is_array=True),
        P("A", ["x", None], "string"), P("R", LOCAL_REF, "reference"),
        P("E", EMBEDDED, "string", embedded_object="instance")]), "INSTANCE"),
    ("instance without properties", CIMInstance("VIRT_Empty"), "INSTANCE"),
    ("instance with qualifiers", CIMInstance("VIRT_Test", properties=[P("X", True)],
                                             qualifiers=[Q("Description", "d", "string")]),
     "INSTANCE"),
]

# --- instance names with every key type -----------------------------------------------

TESTCASES += [
    ("instance name string keys",
     CIMInstanceName("VIRT_X", {"CreationClassName": "VIRT_X", "Name": NASTY}), "INSTANCENAME"),
    ("instance name numeric keys",
     CIMInstanceName("VIRT_X", {"U8": Uint8(255), "U64": Uint64(2**64 - 1),
                                "S8": Sint8(-128), "S64": Sint64(-2**63), "Plain": 42,
                                "Neg": -7}), "INSTANCENAME"),
    ("instance name boolean keys", CIMInstanceName("VIRT_X", {"T": True, "F": False}),
     "INSTANCENAME"),
    ("instance name char16 and datetime keys",
     CIMInstanceName("VIRT_X", {"C": Char16("&"), "D": DT_TS, "I": DT_IV}), "INSTANCENAME"),
    ("instance name reference keys",
     CIMInstanceName("VIRT_HostedDependency", {"Antecedent": HOST_REF, "Dependent": LOCAL_REF,
                                               "Other": FULL_REF}), "INSTANCENAME"),
    ("instance name without keys (singleton)", CIMInstanceName("VIRT_Singleton"),
     "INSTANCENAME"),
    ("instance name newline in key", CIMInstanceName("VIRT_X", {"K": "a\nb\r\nc"}),
     "INSTANCENAME"),
    ("local instance path", LOCAL_REF, "LOCALINSTANCEPATH"),
    ("instance path", FULL_REF, "INSTANCEPATH"),
    ("value.reference instancename", HOST_REF, "VALUE.REFERENCE"),
    ("value.reference local path", LOCAL_REF, "VALUE.REFERENCE"),
    ("value.reference full path", FULL_REF, "VALUE.REFERENCE"),
    ("class path", CIMClassName("CIM_Foo", namespace="root/virt", host="h:5988"),
     "VALUE.REFERENCE"),
    ("local class path", CIMClassName("CIM_Foo", namespace="interop"), "VALUE.REFERENCE"),
    ("class name", CIMClassName("CIM_Foo"), "VALUE.REFERENCE"),
]

# --- classes, methods, parameters, qualifier declarations -----------------------------

METHOD = CIMMethod("DoIt", "uint32", class_origin="VIRT_Klass", propagated=False,
                   qualifiers=[Q("Description", "does <it> & more", "string")],
                   parameters=[
                       CIMParameter("In1", "uint16", qualifiers=[Q("In", True, "boolean")]),
                       CIMParameter("InArr", "string", is_array=True,
                                    qualifiers=[Q("In", True, "boolean")]),
                       CIMParameter("Sized", "sint8", is_array=True, array_size=4),
                       CIMParameter("Ref", "reference", reference_class="CIM_System",
                                    qualifiers=[Q("Out", True, "boolean")]),
                       CIMParameter("RefArr", "reference", is_array=True,
                                    reference_class="CIM_System"),
                       CIMParameter("Plain", "datetime"),
                   ])
KLASS = CIMClass(
    "VIRT_Klass", superclass="CIM_ManagedElement",
    qualifiers=[Q("Description", NASTY, "string"), Q("Version", "2.49.0", "string",
                                                     translatable=True)],
    properties=[
        P("Key1", None, "string", class_origin="VIRT_Klass",
          qualifiers=[Q("Key", True, "boolean", overridable=False)]),
        P("Counter", Uint32(5), class_origin="VIRT_Klass"),
        P("Inherited", "dflt", class_origin="CIM_ManagedElement", propagated=True),
        P("Arr", [Uint8(1), Uint8(2)], class_origin="VIRT_Klass"),
        P("Ref", None, "reference", reference_class="CIM_ManagedElement",
          class_origin="VIRT_Klass"),
        P("Emb", None, "string", embedded_object="instance", class_origin="VIRT_Klass",
          qualifiers=[Q("EmbeddedInstance", "CIM_Foo", "string")]),
    ],
    methods=[METHOD, CIMMethod("NoParams", "string", class_origin="CIM_ManagedElement",
                               propagated=True)])

TESTCASES += [
    ("class with qualifiers, properties, methods, parameters", KLASS, "CLASS"),
    ("class without superclass", CIMClass("CIM_Root"), "CLASS"),
    ("qualifier declaration boolean",
     CIMQualifierDeclaration("Key", "boolean", False, scopes={"PROPERTY": True,
                                                              "REFERENCE": True},
                             overridable=False, tosubclass=True, toinstance=False,
                             translatable=False), "QUALIFIER.DECLARATION"),
    ("qualifier declaration string array with ARRAYSIZE",
     CIMQualifierDeclaration("Values", "string", None, is_array=True, array_size=3,
                             scopes={"PROPERTY": True, "METHOD": True, "PARAMETER": True},
                             overridable=True, tosubclass=True, translatable=True),
     "QUALIFIER.DECLARATION"),
    ("qualifier declaration with default value",
     CIMQualifierDeclaration("Description", "string", "d & <e>",
                             scopes={"CLASS": True, "ASSOCIATION": True, "INDICATION": True,
                                     "PROPERTY": True, "REFERENCE": True, "METHOD": True,
                                     "PARAMETER": True},
                             overridable=True, tosubclass=True, translatable=True),
     "QUALIFIER.DECLARATION"),
    ("qualifier declaration uint32", CIMQualifierDeclaration(
        "MaxLen", "uint32", Uint32(7), scopes={"PROPERTY": True}, overridable=True,
        tosubclass=True), "QUALIFIER.DECLARATION"),
]


# --- writing and reading back ------------------------------------------------------------

def write(obj, kind: str) -> str:
    if kind in ("PROPERTY", "PROPERTY.ARRAY", "PROPERTY.REFERENCE"):
        return w.property_xml(obj, qualifiers=True, class_origin=True)
    if kind == "INSTANCE":
        return w.instance_xml(obj, qualifiers=True, class_origin=True)
    if kind == "INSTANCENAME":
        return w.instancename_xml(obj)
    if kind == "LOCALINSTANCEPATH" or kind == "INSTANCEPATH":
        return w.reference_path_xml(obj)
    if kind == "VALUE.REFERENCE":
        return w.value_xml(obj)
    if kind == "CLASS":
        return w.class_xml(obj, qualifiers=True, class_origin=True)
    if kind == "QUALIFIER.DECLARATION":
        return w.qualifier_declaration_xml(obj)
    raise AssertionError(kind)


def tupletrees(xml: str):
    """The tuple tree from our parser and from pywbem's SAX parser."""
    data = xml.encode("utf-8")
    return [("cim_provider.xmlparse", parse_tupletree(data)),
            ("pywbem sax", xml_to_tupletree_sax(data, "test"))]


_FLAVOR_DEFAULTS = {"overridable": True, "tosubclass": True, "toinstance": False,
                    "translatable": False}


def _default_flavors(q):
    """DSP0201 defaults for flavors left unspecified (None): what a reader assumes."""
    for attr, dflt in _FLAVOR_DEFAULTS.items():
        if getattr(q, attr) is None:
            setattr(q, attr, dflt)
    if isinstance(q, CIMQualifier) and q.propagated is None:
        q.propagated = False


def _normalize(obj):
    for q in getattr(obj, "qualifiers", {}).values():
        _default_flavors(q)
    for p in list(getattr(obj, "properties", {}).values()) + \
            list(getattr(obj, "parameters", {}).values()):
        _normalize(p)
    for m in getattr(obj, "methods", {}).values():
        _normalize(m)
    return obj


def expected(obj, kind):
    """What the parser should return: the same object, except what CIM-XML cannot
    carry differently (ANY scope is written as every scope; unspecified flavors
    read as their DSP0201 defaults)."""
    obj = obj.copy()
    if kind == "QUALIFIER.DECLARATION":
        _default_flavors(obj)
        if "ANY" in obj.scopes and not obj.scopes["ANY"]:     # ANY=false says nothing
            obj.scopes = {k: v for k, v in obj.scopes.items() if k.upper() != "ANY"}
        if obj.scopes.get("ANY"):
            obj.scopes = {k: True for k in ("CLASS", "ASSOCIATION", "REFERENCE", "PROPERTY",
                                            "METHOD", "PARAMETER", "INDICATION")}
        return obj
    return _normalize(obj)


@pytest.mark.filterwarnings("ignore::pywbem.MissingKeybindingsWarning")   # the singleton
@pytest.mark.parametrize("desc,obj,kind", TESTCASES, ids=[t[0] for t in TESTCASES])
def test_roundtrip(desc, obj, kind):
    xml = write(obj, kind)
    assert "/>" not in xml, f"self-closing tag in {xml!r}"
    for parser_name, tt in tupletrees(xml):
        assert tt[0] == kind, parser_name
        parsed = TupleParser().parse_any(tt)
        assert parsed == expected(obj, kind), (
            f"{parser_name}: {desc}\nwritten: {xml}\nparsed:   {parsed!r}\noriginal: {obj!r}")


@pytest.mark.parametrize("value", [Real32(NAN), Real64(NAN)], ids=["real32", "real64"])
def test_nan_roundtrip(value):
    """NaN != NaN, so it gets its own test."""
    for prop in (P("P", value), P("A", [value, Real64(1.0) if isinstance(value, Real64)
                                         else Real32(1.0)])):
        xml = w.property_xml(prop)
        assert "/>" not in xml
        assert "NaN" in xml
        for _name, tt in tupletrees(xml):
            parsed = TupleParser().parse_any(tt)
            assert parsed.type == prop.type
            v = parsed.value[0] if prop.is_array else parsed.value
            assert math.isnan(v)


def test_roundtrip_repository_classes():
    """Every compiled class (DMTF + mof/) and qualifier declaration round-trips with
    qualifiers and class origin: the objects GetClass / EnumerateQualifiers send."""
    from cim_provider.wbem.repository import Repository
    repo = Repository.load()
    n = 0
    for nsname in repo.namespace_names:
        ns = repo.namespace(nsname)
        for cls in ns.classes.values():
            xml = w.class_xml(cls, qualifiers=True, class_origin=True)
            assert "/>" not in xml
            parsed = TupleParser().parse_any(parse_tupletree(xml.encode()))
            assert parsed == expected(cls, "CLASS"), cls.classname
            n += 1
        for q in ns.qualifiers.values():
            xml = w.qualifier_declaration_xml(q)
            assert "/>" not in xml
            parsed = TupleParser().parse_any(parse_tupletree(xml.encode()))
            assert parsed == expected(q, "QUALIFIER.DECLARATION"), q.name
    assert n > 50


def test_class_without_qualifiers_and_origin():
    xml = w.class_xml(KLASS, qualifiers=False, class_origin=False)
    assert "/>" not in xml and "QUALIFIER" not in xml and "CLASSORIGIN" not in xml
    parsed = TupleParser().parse_any(parse_tupletree(xml.encode()))
    assert set(parsed.properties) == set(KLASS.properties)
    assert set(parsed.methods) == set(KLASS.methods)
    assert set(parsed.methods["DoIt"].parameters) == set(METHOD.parameters)
    assert not parsed.qualifiers


INST = CIMInstance("VIRT_Test", properties=[P("Name", "n&1"), P("V", Uint16(1))],
                   path=CIMInstanceName("VIRT_Test", {"Name": "n&1"}, namespace="root/virt",
                                        host="h.example"))


@pytest.mark.parametrize("kind", ["VALUE.NAMEDINSTANCE", "VALUE.OBJECTWITHPATH",
                                  "VALUE.INSTANCEWITHPATH"])
def test_instance_with_path_wrappers(kind):
    fn = {"VALUE.NAMEDINSTANCE": w.value_namedinstance_xml,
          "VALUE.OBJECTWITHPATH": w.value_objectwithpath_xml,
          "VALUE.INSTANCEWITHPATH": w.value_instancewithpath_xml}[kind]
    xml = fn(INST)
    assert "/>" not in xml
    parsed = TupleParser().parse_any(parse_tupletree(xml.encode()))
    if isinstance(parsed, tuple):      # VALUE.OBJECTWITHPATH: (name, attrs, object)
        parsed = parsed[2]
    assert isinstance(parsed, CIMInstance)
    assert parsed.properties == INST.properties
    if kind == "VALUE.NAMEDINSTANCE":     # INSTANCENAME: class and keys only
        assert parsed.path.classname == INST.path.classname
        assert parsed.path.keybindings == INST.path.keybindings
        assert parsed.path.namespace is None and parsed.path.host is None
    else:
        assert parsed.path == INST.path
        assert parsed.path.host == "h.example" and parsed.path.namespace == "root/virt"


def test_objectpath_wrapper_uses_given_host():
    xml = w.objectpath_xml(LOCAL_REF, "srv.example")
    parsed = TupleParser().parse_any(parse_tupletree(xml.encode()))[2]
    assert parsed.host == "srv.example" and parsed.namespace == "root/virt"
    assert parsed.keybindings == LOCAL_REF.keybindings


@pytest.mark.parametrize("desc", ["plain", "markup and quotes", "newline and tab", "non-ASCII",
                                  "invalid XML characters"])
def test_error_roundtrip(desc):
    text = {"plain": "no such class",
            "markup and quotes": "<x a=\"b\"> & 'c'",
            "newline and tab": "first line\nsecond\tline\r",
            "non-ASCII": "\u00e9\u4e2d\U0001F600",
            "invalid XML characters": "bad\x00\x01char"}[desc]
    xml = w.error_xml(6, text)
    assert "/>" not in xml
    for _name, tt in tupletrees(xml):
        name, attrs, _kids = TupleParser().parse_any(tt)
        assert name == "ERROR"
        assert set(attrs) == {"CODE", "DESCRIPTION"}     # all wbemcli accepts
        assert attrs["CODE"] == "6"
        if desc == "invalid XML characters":
            assert attrs["DESCRIPTION"] == "bad\ufffd\ufffdchar"
        else:
            assert attrs["DESCRIPTION"] == text


def test_invalid_xml_characters_in_values_are_replaced():
    prop = P("S", "a\x00b\x1fc\ud800d")
    xml = w.property_xml(prop)
    parsed = TupleParser().parse_any(parse_tupletree(xml.encode("utf-8", "replace")))
    assert parsed.value == "a\ufffdb\ufffdc\ufffdd"


def test_whole_response_message():
    """message_start / IRETURNVALUE / message_end parse as a complete CIM response."""
    body = (w.message_start("1001", True, "EnumerateInstances") + "<IRETURNVALUE>"
            + w.value_namedinstance_xml(INST) + "</IRETURNVALUE>" + w.message_end(True))
    assert body.startswith('<?xml version="1.0" encoding="utf-8" ?>')
    assert "standalone" not in body and "/>" not in body
    for _name, tt in tupletrees(body):
        cim = TupleParser().parse_cim(tt)
        assert cim[0] == "CIM"
    tt = parse_tupletree(body.encode())
    msg = tt[2][0]
    rsp = msg[2][0][2][0]
    assert msg[1]["ID"] == "1001" and rsp[0] == "IMETHODRESPONSE"
    assert rsp[1] == {"NAME": "EnumerateInstances"}


@pytest.mark.parametrize("value,type_", [
    (Uint64(2**64 - 1), "uint64"), (True, "boolean"), ("s & <t>", "string"),
    (LOCAL_REF, "reference"), ([LOCAL_REF, HOST_REF, FULL_REF], "reference"),
    (["a", "b"], "string"), (DT_IV, "datetime"), (Real32(-INF), "real32")])
def test_paramvalue_and_returnvalue(value, type_):
    xml = w.paramvalue_xml("Out", value, type_)
    assert "/>" not in xml
    name, ptype, parsed = TupleParser().parse_any(parse_tupletree(xml.encode()))
    assert (name, ptype) == ("Out", type_)
    if type_ == "reference":
        assert parsed == value
    elif isinstance(value, list):
        assert parsed == value
    else:
        assert parsed == w.scalar_text(value)
    rxml = w.returnvalue_xml(value, type_)
    assert "/>" not in rxml
    assert parse_tupletree(rxml.encode())[1] == {"PARAMTYPE": type_}


def test_null_elements_in_non_string_arrays():
    """pywbem 1.9's TupleParser cannot read VALUE.NULL in a non-string array (it asserts),
    so check the written structure directly."""
    xml = w.property_xml(P("A", [None, Uint32(1), None], "uint32"))
    assert xml == ('<PROPERTY.ARRAY NAME="A" TYPE="uint32"><VALUE.ARRAY>'
                   '<VALUE.NULL></VALUE.NULL><VALUE>1</VALUE><VALUE.NULL></VALUE.NULL>'
                   '</VALUE.ARRAY></PROPERTY.ARRAY>')


def test_null_output_parameter_left_out():
    assert w.paramvalue_xml("Job", None, "reference") == ""
    assert w.returnvalue_xml(None, "uint32") == ""


# --- the fast paths of wbem/render.py (issue 16) ----------------------------------------
# An Instance built from values is written from the values (instance_xml_of), its name
# from the path's key values (instancename_of), and a PropertyList view cut out of the
# written bytes (cut_body): each is read back here like every case above.

def _fast_class():
    """A class with one scalar and one array property per CIM type of SCALARS."""
    from pywbem import CIMClass
    from pywbem._cim_types import cimtype
    props = [CIMProperty("Id", None, type="string", class_origin="VIRT_Fast",
                         qualifiers=[Q("Key", True, "boolean", overridable=False)])]
    for i, (_desc, value) in enumerate(SCALARS):
        t = cimtype(value)
        props.append(CIMProperty(f"S{i}", None, type=t, class_origin="VIRT_Fast"))
        props.append(CIMProperty(f"A{i}", None, type=t, is_array=True, class_origin="VIRT_Fast"))
    props.append(CIMProperty("R", None, type="reference", reference_class="CIM_System",
                             class_origin="VIRT_Fast"))
    props.append(CIMProperty("E", None, type="string", embedded_object="instance",
                             class_origin="VIRT_Fast"))
    return CIMClass("VIRT_Fast", properties=props)


FAST_CLASS = _fast_class()


def _fast_values(k: int) -> dict:
    values: dict = {"Id": f"id {k} {NASTY}"}
    for i, (_desc, value) in enumerate(SCALARS):
        if isinstance(value, float) and math.isnan(value):
            continue
        values[f"S{i}"] = value
        values[f"A{i}"] = [value, None, value] if k % 2 else [value]
    # plain Python values, as providers pass them (typed by the class when written)
    values.update({"S0": 7 + k, "A2": [k, 65535], "S22": bool(k % 2)})
    values["R"], values["E"] = LOCAL_REF, EMBEDDED
    return values


def _eager(cls, values: dict, path) -> CIMInstance:
    props = []
    for name, value in values.items():
        if value is None:
            continue
        d = cls.properties[name]
        props.append(CIMProperty(d.name, value, type=d.type, reference_class=d.reference_class,
                                 embedded_object=d.embedded_object, is_array=d.is_array,
                                 propagated=False))
    return CIMInstance(cls.classname, properties=props, path=path)


@pytest.mark.parametrize("k", range(4))
def test_instance_written_from_values(k):
    from cim_provider.wbem import render
    from cim_provider.wbem.instance import build_instance
    values = _fast_values(k)
    path = CIMInstanceName("VIRT_Fast", {"Id": values["Id"]}, namespace="root/virt")
    inst = build_instance(FAST_CLASS, values, path)
    for _round in range(2):                     # the second through the value memo
        xml = render.body_of(build_instance(FAST_CLASS, values, path)).decode("utf-8")
        assert xml == w.instance_xml(_eager(FAST_CLASS, values, path))
        assert "/>" not in xml
        if k % 2:       # NULL array elements: pywbem 1.9 cannot read them in non-string
            continue    # arrays (see test_null_elements_in_non_string_arrays)
        for parser_name, tt in tupletrees(xml):
            parsed = TupleParser().parse_any(tt)
            assert parsed == expected(_eager(FAST_CLASS, values, None), "INSTANCE"), parser_name
    name = render.name_of(inst).decode("utf-8")
    assert name == w.instancename_xml(path)
    for _parser_name, tt in tupletrees(name):
        parsed = TupleParser().parse_any(tt)
        assert parsed.keybindings == path.keybindings and parsed.classname == "VIRT_Fast"


@pytest.mark.parametrize("seed", range(6))
def test_property_list_cut_from_written_bytes(seed):
    import random
    from cim_provider.wbem import render
    from cim_provider.wbem.instance import build_instance
    values = _fast_values(0)
    path = CIMInstanceName("VIRT_Fast", {"Id": values["Id"]}, namespace="root/virt")
    inst = build_instance(FAST_CLASS, values, path)
    names = list(inst.properties)
    keep = random.Random(seed).sample(names, seed * 7 % len(names))
    allowed = {n.lower() for n in keep}
    xml = render.cut_body(render.body_of(inst), allowed).decode("utf-8")
    assert "/>" not in xml
    for parser_name, tt in tupletrees(xml):
        parsed = TupleParser().parse_any(tt)
        want = _eager(FAST_CLASS, {k: v for k, v in values.items() if k.lower() in allowed},
                      None)
        assert parsed == expected(want, "INSTANCE"), parser_name
