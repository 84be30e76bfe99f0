"""Embedded-instance output parameters (GetError's Error, issue 12) as DSP0200 writes
them: PARAMVALUE PARAMTYPE="string" EmbeddedObject="instance", the VALUE holding the
escaped INSTANCE text. Each case is written with cim_provider.wbem.writer.paramvalue_xml,
read back by our parser and by pywbem's SAX parser, then by pywbem's TupleParser (what
a pywbem client's InvokeMethod does), and compared with the original.
"""
from __future__ import annotations

import pytest
from pywbem import CIMInstance, CIMProperty, Uint16, Uint32
from pywbem._tupleparse import TupleParser
from pywbem._tupletree import xml_to_tupletree_sax

from cim_provider.wbem import writer as w
from cim_provider.wbem.xmlparse import parse_tupletree


def P(name, value, type_=None):
    return CIMProperty(name, value, type=type_, propagated=False)


ERROR = CIMInstance("CIM_Error", properties=[
    P("Message", "the guest did not shut down within 3 s <&> \"'"),
    P("CIMStatusCode", Uint32(1)),
    P("ErrorSource", 'root/virt:VIRT_ConcreteJob.InstanceID="VIRT:job:1"'),
    P("ErrorType", Uint16(4)),
])
OTHER = CIMInstance("CIM_Error", properties=[P("Message", "second"),
                                             P("CIMStatusCode", Uint32(7))])


def read_back(xml: str):
    """(name, PARAMTYPE, value, attributes) through both tuple-tree builders."""
    ours = parse_tupletree(xml.encode("utf-8"))
    theirs = xml_to_tupletree_sax(xml.encode("utf-8"), "PARAMVALUE")
    parsed = TupleParser().parse_any(ours)
    assert TupleParser().parse_any(theirs) == parsed
    return (*parsed, ours[1])


@pytest.mark.parametrize("desc,value,type_,embedded,expected,attrs", [
    ("one instance", ERROR, "string", "instance", ERROR,
     {"PARAMTYPE": "string", "EmbeddedObject": "instance"}),
    ("one instance, no declared type", ERROR, None, None, ERROR,
     {"PARAMTYPE": "string", "EmbeddedObject": "instance"}),
    ("array of instances", [ERROR, OTHER], "string", "instance", [ERROR, OTHER],
     {"PARAMTYPE": "string", "EmbeddedObject": "instance"}),
    ("instance already rendered as text", w.instance_xml(ERROR), "string", "instance",
     ERROR, {"PARAMTYPE": "string", "EmbeddedObject": "instance"}),
    ("plain string of an EmbeddedInstance parameter that is not XML", "MOF text", "string",
     "instance", "MOF text", {"PARAMTYPE": "string"}),
    ("plain string", "a <b> & c", "string", None, "a <b> & c", {"PARAMTYPE": "string"}),
])
def test_embedded_instance_output_round_trip(desc, value, type_, embedded, expected, attrs):
    xml = w.paramvalue_xml("Error", value, type_, embedded)
    assert "/>" not in xml, desc                  # sblim wbemcli cannot read those
    name, ptype, parsed, got_attrs = read_back(xml)
    assert (name, ptype) == ("Error", "string"), desc
    assert {k: v for k, v in got_attrs.items() if k != "NAME"} == attrs, desc
    assert parsed == expected, desc
    if isinstance(expected, CIMInstance):
        assert isinstance(parsed, CIMInstance) and parsed.classname == "CIM_Error"
        assert parsed["Message"] == ERROR["Message"]


@pytest.mark.parametrize("value,type_", [(None, "string"), (None, None),
                                         (None, "reference")])
def test_null_output_is_left_out(value, type_):
    assert w.paramvalue_xml("Error", value, type_, "instance") == ""


def test_array_with_a_null_instance():
    xml = w.paramvalue_xml("Errors", [ERROR, None], "string", "instance")
    assert 'EmbeddedObject="instance"' in xml and "<VALUE.NULL></VALUE.NULL>" in xml
    tree = parse_tupletree(xml.encode())
    assert tree[2][0][0] == "VALUE.ARRAY"
    assert [c[0] for c in tree[2][0][2]] == ["VALUE", "VALUE.NULL"]
