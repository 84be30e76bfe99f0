"""VIRT_ComputerSystem written from its templates (providers/computer_system.py,
system_body) and instance names from their kept heads and tails (wbem/render.py,
instancename_of): the same bytes as the general writer, for every kind of record, and
readable by pywbem.

Each case is a record; its system is written three ways and compared: the template
(render.body_of), the general path from the same values (instance_xml_of), and
pywbem-typed properties through writer.instance_xml. The third is read back with
pywbem's TupleParser.
"""
from __future__ import annotations

import pytest
from pywbem import CIMInstance, CIMInstanceName, CIMProperty
from pywbem._tupleparse import TupleParser
from pywbem._tupletree import xml_to_tupletree_sax

from cim_provider.domain.records import DomainConfig, DomainRecord, RunningDomain, RunState
from cim_provider.providers import computer_system as cs
from cim_provider.wbem import render
from cim_provider.wbem import writer as w
from cim_provider.wbem.repository import Repository

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
NASTY = "a<b>c&d\"e'f \u00e9\u4e2d\U0001F600 ]]> &amp; \r\x01"
MARKS = "\ue000U\ue001 \ue000N\ue001 \ue000"      # the template's own markers in a value
BRACES = "{0}{1} }{ {{x}} {2!r:>9} {"            # format fields and stray braces


def config(name: str = "web", title: str | None = None, autostart: bool | None = None,
           uuid: str = UUID) -> DomainConfig:
    return DomainConfig(uuid=uuid, name=name, title=title, autostart=autostart)


def running(state: RunState = RunState.RUNNING, persistent: bool = False, **kw
            ) -> RunningDomain:
    return RunningDomain(config=config(**kw), state=state, persistent=persistent, id=3)


TESTCASES = [
    # (description, record, RequestedState, template used)
    ("running only", DomainRecord(UUID, running=running()), 12, True),
    ("running only, persistent in libvirt",
     DomainRecord(UUID, running=running(persistent=True)), 12, True),
    ("both", DomainRecord(UUID, running=running(), defined=config(autostart=True)), 2, True),
    ("passive", DomainRecord(UUID, defined=config(autostart=False)), 3, True),
    ("passive, autostart unknown", DomainRecord(UUID, defined=config()), 12, True),
    ("paused", DomainRecord(UUID, running=running(RunState.PAUSED)), 9, True),
    ("crashed while running", DomainRecord(UUID, running=running(RunState.CRASHED)), 12, True),
    ("pmsuspended", DomainRecord(UUID, running=running(RunState.PMSUSPENDED)), 12, True),
    ("shutting down", DomainRecord(UUID, running=running(RunState.SHUTDOWN)), 3, True),
    ("titled", DomainRecord(UUID, running=running(title="Web server")), 12, True),
    ("empty title: the name is the caption",
     DomainRecord(UUID, running=running(title="")), 12, True),
    ("markup in name and title",
     DomainRecord(UUID, running=running(name=NASTY, title=NASTY)), 12, True),
    ("the template's markers in name and title",
     DomainRecord(UUID, running=running(name=MARKS, title=MARKS)), 12, True),
    ("markers in the UUID key", DomainRecord(MARKS, defined=config(uuid=MARKS)), 12, True),
    ("braces in name and title (a template is a format string)",
     DomainRecord(UUID, running=running(name=BRACES, title=BRACES)), 12, True),
    ("braces in the UUID key", DomainRecord(BRACES, defined=config(uuid=BRACES)), 12, True),
    ("stopped on a failure: the general way",
     DomainRecord(UUID, defined=config(), stop_reason="crashed <oops> & gone"), 12, False),
]


def general(rec: DomainRecord, req: int) -> CIMInstance:
    """The system as pywbem objects typed by the class, the way any instance is."""
    cls = Repository.load().namespace(cs.VIRT_NS).get(cs.CS_CLASS)
    props = []
    for name, value in cs.system_values(rec, req).items():
        if value is None:
            continue
        d = cls.properties[name]
        props.append(CIMProperty(d.name, value, type=d.type, is_array=d.is_array,
                                 propagated=False))
    return CIMInstance(cs.CS_CLASS, properties=props)


@pytest.fixture(scope="module")
def cls():
    return Repository.load().namespace(cs.VIRT_NS).get(cs.CS_CLASS)


@pytest.mark.parametrize("desc,rec,req,templated", TESTCASES, ids=[t[0] for t in TESTCASES])
def test_system_written_from_template(desc, rec, req, templated, cls):
    expected = w.instance_xml(general(rec, req))
    for _round in range(2):                   # the second from the kept template
        inst = cs.SystemInstance(rec, req, cls)
        assert (inst.body_text() is not None) == templated
        assert render.body_of(inst).decode("utf-8") == expected
        assert render.instance_xml_of(cs.CS_CLASS, *inst.shaped()) == expected
    parsed = TupleParser().parse_any(xml_to_tupletree_sax(expected.encode("utf-8"), "test"))
    assert parsed["Name"] == rec.uuid
    # what XML cannot carry (\x01) arrives as U+FFFD, the rest as it was
    assert parsed["ElementName"] == rec.name.replace("\x01", "\ufffd")
    assert parsed["Caption"] == (rec.current.title or rec.name).replace("\x01", "\ufffd")


def test_templates_follow_the_class(cls):
    """A template is kept per class object: another class of the same name (a
    reloaded schema) gets its own, written from its own declarations."""
    rec = DomainRecord(UUID, running=running())
    first = cs.SystemInstance(rec, 12, cls).body_text()
    other = cls.copy()
    del other.properties["PrimaryStatus"]
    with pytest.raises(KeyError):      # not declared: refused as the general path does
        cs.SystemInstance(rec, 12, other).body_text()
    other = cls.copy()
    assert cs.SystemInstance(rec, 12, other).body_text() == first
    assert any(kept is other for kept, _template in cs._TEMPLATES.values())


def test_braces_in_the_fixed_text_are_written_as_they_are(cls, monkeypatch):
    """A template is a format string: braces of its own fixed text (here a kind's
    description) come out as they are, beside braces in the values."""
    from cim_provider.domain.records import Kind
    monkeypatch.setitem(cs._KIND_TEXT, Kind.RUNNING_ONLY, "odd {0} }{ {{x}} {2!r} text {")
    monkeypatch.setattr(cs, "_TEMPLATES", {})
    rec = DomainRecord(UUID, running=running(name=BRACES, title=BRACES))
    inst = cs.SystemInstance(rec, 12, cls)
    assert inst.body_text() is not None
    assert render.body_of(inst).decode("utf-8") == w.instance_xml(general(rec, 12))
    assert "odd {0} }{ {{x}} {2!r} text {" in inst.body_text()


NAME_CASES = [
    ("one key", ("VIRT_X",), ("k",), ("only",)),
    ("two keys", ("VIRT_X",), ("CreationClassName", "Name"), ("VIRT_X", UUID)),
    ("markup", ("VIRT_X",), ("A", "B"), (NASTY, NASTY)),
    ("marker in an earlier key", ("VIRT_X",), ("A", "B"), ("\ue000", "v\ue000")),
    ("four keys", ("VIRT_Disk",), ("SystemCreationClassName", "SystemName",
                                   "CreationClassName", "DeviceID"),
     ("VIRT_ComputerSystem", UUID, "VIRT_Disk", "vda")),
]


@pytest.mark.parametrize("desc,classname,keys,values", NAME_CASES,
                         ids=[t[0] for t in NAME_CASES])
def test_instancename_from_kept_parts(desc, classname, keys, values):
    path = CIMInstanceName(classname[0], dict(zip(keys, values)))
    expected = w.instancename_xml(path)
    for _round in range(2):
        assert render.instancename_of(classname[0], keys, values) == expected
    parsed = TupleParser().parse_any(xml_to_tupletree_sax(expected.encode("utf-8"), "test"))
    assert parsed.classname == classname[0]


def test_instancename_parts_kept_for_few_prefixes():
    """Names whose other keys vary per instance (a device's SystemName) are written
    the long way once the table is full: it never grows past its bound."""
    for i in range(render._NAME_AROUND_MAX * 2):
        keys = ("SystemName", "DeviceID")
        values = (f"sys-{i}", "vda")
        assert render.instancename_of("VIRT_Disk", keys, values) == w.instancename_xml(
            CIMInstanceName("VIRT_Disk", dict(zip(keys, values))))
    assert len(render._NAME_AROUND) <= render._NAME_AROUND_MAX


def test_a_renamed_system_is_written_the_general_way(cls):
    """The template names VIRT_ComputerSystem; an instance whose class name was set
    otherwise is written from its values, under its own name."""
    inst = cs.SystemInstance(DomainRecord(UUID, running=running()), 12, cls)
    inst.classname = "VIRT_Other"
    assert inst.body_text() is None
    assert render.body_of(inst).decode("utf-8").startswith('<INSTANCE CLASSNAME="VIRT_Other">')
