"""The request parser (cim_provider.wbem.xmlparse and request.parse_request): pywbem's
tuple-tree shape, no DTDs or entity declarations, bounded depth, linear on entity
references, short error reasons."""
from __future__ import annotations

import pytest
from pywbem import CIMClassName, CIMInstanceName
from pywbem._tupletree import xml_to_tupletree_sax

from cim_provider.wbem.request import RequestError, parse_request
from cim_provider.wbem.xmlparse import XMLRequestError, parse_tupletree


def _strip(node):
    """A tuple tree without whitespace-only text, as (name, attrs, children)."""
    kids = []
    for c in node[2]:
        if isinstance(c, tuple):
            kids.append(_strip(c))
        elif c.strip():
            kids.append(c)
    return (node[0], dict(node[1]), kids)


def _merge_text(node):
    """pywbem's SAX handler may split text into several strings; join adjacent ones."""
    kids = []
    for c in node[2]:
        if isinstance(c, tuple):
            kids.append(_merge_text(c))
        elif kids and isinstance(kids[-1], str):
            kids[-1] += c
        else:
            kids.append(c)
    return (node[0], node[1], kids)


def imethodcall(method: str, params: str = "", ns: str = "root/virt", msg_id: str = "1") -> bytes:
    nsx = "".join(f'<NAMESPACE NAME="{p}"/>' for p in ns.split("/"))
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{msg_id}" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            f'<IMETHODCALL NAME="{method}"><LOCALNAMESPACEPATH>{nsx}</LOCALNAMESPACEPATH>'
            f'{params}</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>').encode()


SAMPLES = [
    imethodcall("EnumerateInstances", '<IPARAMVALUE NAME="ClassName">'
                '<CLASSNAME NAME="CIM_ComputerSystem"/></IPARAMVALUE>'),
    imethodcall("GetInstance", '<IPARAMVALUE NAME="InstanceName">'
                '<INSTANCENAME CLASSNAME="VIRT_X"><KEYBINDING NAME="K">'
                '<KEYVALUE VALUETYPE="string">a &amp; b &lt;c&gt; &#233; \u4e2d</KEYVALUE>'
                '</KEYBINDING></INSTANCENAME></IPARAMVALUE>'),
    b'<?xml version="1.0"?>\n<CIM CIMVERSION="2.0" DTDVERSION="2.0">\n  <MESSAGE ID="9" '
    b'PROTOCOLVERSION="1.0">\n <SIMPLEREQ><METHODCALL NAME="M"><LOCALCLASSPATH>'
    b'<LOCALNAMESPACEPATH><NAMESPACE NAME="interop"/></LOCALNAMESPACEPATH>'
    b'<CLASSNAME NAME="C"/></LOCALCLASSPATH><PARAMVALUE NAME="P"><VALUE><![CDATA[<raw & text>]]>'
    b'</VALUE></PARAMVALUE></METHODCALL></SIMPLEREQ></MESSAGE></CIM>\n',
]


@pytest.mark.parametrize("body", SAMPLES, ids=["enumerate", "entities", "cdata-whitespace"])
def test_same_tree_as_pywbem(body):
    ours = parse_tupletree(body)
    theirs = xml_to_tupletree_sax(body, "request")
    assert _strip(_merge_text(ours)) == _strip(_merge_text(theirs))


def test_text_is_one_string_per_run():
    body = imethodcall("GetQualifier", '<IPARAMVALUE NAME="QualifierName"><VALUE>'
                       + "&amp;" * 1000 + "x</VALUE></IPARAMVALUE>")
    tree = parse_tupletree(body)
    value = tree[2][0][2][0][2][0][2][1][2][0]
    assert value[0] == "VALUE"
    assert value[2] == ["&" * 1000 + "x"]


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE CIM SYSTEM "CIM_DTD_V22.dtd"><CIM/>',
    b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>',
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
    b'"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;'
    b'&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><lolz>&lol3;</lolz>',
    b'<x><!ENTITY y "z"></x>',
], ids=["doctype", "internal-subset", "billion-laughs", "stray-entity-decl"])
def test_dtd_and_entities_refused(body):
    with pytest.raises(XMLRequestError) as exc:
        parse_tupletree(body)
    assert "DOCTYPE" in exc.value.reason


def test_doctype_in_utf16_refused():
    """The byte pre-check cannot see a UTF-16 DOCTYPE; expat's handler must still refuse."""
    body = '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>'
    with pytest.raises(XMLRequestError) as exc:
        parse_tupletree(body.encode("utf-16"))
    assert "DOCTYPE" in exc.value.reason


def test_undefined_entity_is_malformed():
    with pytest.raises(XMLRequestError) as exc:
        parse_tupletree(b"<x>&nope;</x>")
    assert exc.value.reason.startswith("malformed XML")


@pytest.mark.parametrize("body", [
    b"", b"<CIM>", b"<CIM><MESSAGE></CIM>", b"not xml at all", b"<a></a><b></b>",
    imethodcall("EnumerateInstances")[:-20],
], ids=["empty", "unclosed", "mismatched", "text", "two-roots", "truncated"])
def test_malformed(body):
    with pytest.raises(XMLRequestError) as exc:
        parse_tupletree(body)
    assert len(exc.value.reason) < 200


def test_depth_limit():
    ok = b"<a>" * 10 + b"</a>" * 10
    assert parse_tupletree(ok, max_depth=10)[0] == "a"
    deep = b"<a>" * 11 + b"</a>" * 11
    with pytest.raises(XMLRequestError) as exc:
        parse_tupletree(deep, max_depth=10)
    assert "deeper" in exc.value.reason


def test_very_deep_nesting_refused_without_recursion_error():
    body = b"<a>" * 100000 + b"</a>" * 100000
    with pytest.raises(XMLRequestError):
        parse_tupletree(body)


@pytest.mark.timeout(60)
def test_many_entity_references_parse():
    """7.5 MB of &amp; in one text node: pywbem's SAX handler is quadratic here; ours
    is linear (the timeout, not a clock assertion, bounds it)."""
    n = 7_500_000 // 5
    body = imethodcall("GetQualifier", '<IPARAMVALUE NAME="QualifierName"><VALUE>'
                       + "&amp;" * n + "</VALUE></IPARAMVALUE>")
    req = parse_request(body)
    assert req.params["QualifierName"] == "&" * n


# --- parse_request: DSP0201 framing ---------------------------------------------------------

def test_parse_request_intrinsic():
    req = parse_request(SAMPLES[1])
    assert req.intrinsic and req.method == "GetInstance" and req.namespace == "root/virt"
    assert req.msg_id == "1"
    path = req.params["InstanceName"]
    assert isinstance(path, CIMInstanceName)
    assert path.keybindings["K"] == "a & b <c> \u00e9 \u4e2d"


def test_parse_request_extrinsic_untyped_params():
    req = parse_request(SAMPLES[2])
    assert not req.intrinsic and req.method == "M" and req.namespace == "interop"
    assert isinstance(req.target, CIMClassName) and req.target.classname == "C"
    assert req.params == {"P": (None, "<raw & text>")}


def test_parse_request_extrinsic_instance_target_and_typed_params():
    body = (b'<?xml version="1.0"?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="7" '
            b'PROTOCOLVERSION="1.0"><SIMPLEREQ><METHODCALL NAME="RequestStateChange">'
            b'<LOCALINSTANCEPATH><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/>'
            b'<NAMESPACE NAME="virt"/></LOCALNAMESPACEPATH><INSTANCENAME CLASSNAME="VIRT_X">'
            b'<KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">u</KEYVALUE></KEYBINDING>'
            b'</INSTANCENAME></LOCALINSTANCEPATH>'
            b'<PARAMVALUE NAME="RequestedState" PARAMTYPE="uint16"><VALUE>3</VALUE></PARAMVALUE>'
            b'<PARAMVALUE NAME="List"><VALUE.ARRAY><VALUE>a</VALUE><VALUE>b</VALUE>'
            b'</VALUE.ARRAY></PARAMVALUE></METHODCALL></SIMPLEREQ></MESSAGE></CIM>')
    req = parse_request(body)
    assert req.namespace == "root/virt"
    assert req.target == CIMInstanceName("VIRT_X", {"Name": "u"}, namespace="root/virt")
    assert req.params == {"RequestedState": ("uint16", "3"), "List": (None, ["a", "b"])}


def test_duplicate_parameter_marked():
    """Valid CIM-XML: parsed, the repeat marked for the dispatcher's
    CIM_ERR_INVALID_PARAMETER (DSP0200), the first value kept."""
    body = imethodcall("EnumerateInstances", '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="A"/>'
                       '</IPARAMVALUE><IPARAMVALUE NAME="classname"><CLASSNAME NAME="B"/>'
                       '</IPARAMVALUE>')
    req = parse_request(body)
    assert req.duplicate == "classname" and req.params["ClassName"].classname == "A"


def test_many_parameters_parse_and_duplicates_found_among_them():
    """The duplicate check is linear: 20,000 distinct parameters parse (the default
    test timeout bounds it; the quadratic check took minutes), and a repeat of the
    first one, in another case, at the very end is still found."""
    params = "".join(f'<IPARAMVALUE NAME="P{i}"><VALUE>x</VALUE></IPARAMVALUE>'
                     for i in range(20000))
    req = parse_request(imethodcall("GetClass", params))
    assert len(req.params) == 20000 and req.params["P19999"] == "x"
    assert req.duplicate is None
    req = parse_request(imethodcall("GetClass", params + '<IPARAMVALUE NAME="p0"><VALUE>y'
                                    '</VALUE></IPARAMVALUE>'))
    assert req.duplicate == "p0" and req.params["P0"] == "x"


@pytest.mark.parametrize("body,status,cim_error", [
    (b"<CIM", 400, "request-not-well-formed"),
    (b'<!DOCTYPE CIM><CIM/>', 400, "request-not-well-formed"),
    (b'<NOTCIM/>', 400, "request-not-valid"),
    (b'<CIM CIMVERSION="3.0" DTDVERSION="2.0"/>', 501, "unsupported-cim-version"),
    (b'<CIM CIMVERSION="2.0" DTDVERSION="9.0"/>', 501, "unsupported-dtd-version"),
    (b'<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE PROTOCOLVERSION="1.0"/></CIM>', 400,
     "request-not-valid"),
    (b'<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0">'
     b'<MULTIREQ/></MESSAGE></CIM>', 501, "multiple-requests-unsupported"),
    (b'<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0">'
     b'<SIMPLEREQ><IMETHODCALL NAME="X"/></SIMPLEREQ></MESSAGE></CIM>', 400, "request-not-valid"),
    (b'<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0">'
     b'<SIMPLEREQ><METHODCALL NAME="X"><PARAMVALUE NAME="a"/></METHODCALL></SIMPLEREQ>'
     b'</MESSAGE></CIM>', 400, "request-not-valid"),
], ids=["truncated", "doctype", "wrong-root", "cimversion", "dtdversion", "no-id", "multireq",
        "no-namespace", "no-target"])
def test_parse_request_errors(body, status, cim_error):
    with pytest.raises(RequestError) as exc:
        parse_request(body)
    assert (exc.value.status, exc.value.cim_error) == (status, cim_error)
    assert len(exc.value.reason) <= 310


def test_error_reason_does_not_echo_large_content():
    big = "A" * 100000
    body = imethodcall("GetInstance", f'<IPARAMVALUE NAME="InstanceName"><INSTANCENAME '
                       f'CLASSNAME="X"><KEYBINDING NAME="{big}"><BOGUS/></KEYBINDING>'
                       '</INSTANCENAME></IPARAMVALUE>')
    with pytest.raises(RequestError) as exc:
        parse_request(body)
    assert exc.value.status == 400
    assert len(exc.value.reason) <= 310


def test_dismantled_tree_leaves_the_request_whole(monkeypatch):
    """A large request's tree is taken apart after parsing (so freeing it cannot stall
    the event loop): nothing the request holds may come from the emptied lists."""
    from cim_provider.wbem import request as request_mod
    params = ('<IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY><VALUE>A</VALUE><VALUE>B</VALUE>'
              '</VALUE.ARRAY></IPARAMVALUE><IPARAMVALUE NAME="InstanceName">'
              '<INSTANCENAME CLASSNAME="X"><KEYBINDING NAME="K"><KEYVALUE VALUETYPE="string">'
              'v</KEYVALUE></KEYBINDING><KEYBINDING NAME="R"><VALUE.REFERENCE>'
              '<INSTANCENAME CLASSNAME="Y"><KEYBINDING NAME="Z"><KEYVALUE>1</KEYVALUE>'
              '</KEYBINDING></INSTANCENAME></VALUE.REFERENCE></KEYBINDING></INSTANCENAME>'
              '</IPARAMVALUE>')
    body = imethodcall("GetInstance", params)
    kept = parse_request(body)
    monkeypatch.setattr(request_mod, "DISMANTLE_ABOVE", 0)
    dismantled = parse_request(body)
    assert dismantled.params == kept.params
    assert dismantled.params["PropertyList"] == ["A", "B"]
    assert dismantled.params["InstanceName"].keybindings["R"].keybindings["Z"] is not None


def _chunked(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


CHUNKINGS = [("whole", None), ("1-byte chunks", 1), ("7-byte chunks", 7), ("300-byte chunks", 300)]


@pytest.mark.parametrize("desc, size", CHUNKINGS)
@pytest.mark.parametrize("slice_size", [5, 64, 256 * 1024])
def test_chunks_and_slices_give_the_same_tree(desc, size, slice_size, monkeypatch):
    """A body parsed from the chunks it arrived in, and fed to expat a slice at a time
    (issue 16: bounded C calls beside the event loop), gives the tree of the whole body,
    multi-byte characters split between chunks included."""
    import cim_provider.wbem.xmlparse as xp
    monkeypatch.setattr(xp, "SLICE", slice_size)
    for body in SAMPLES:
        got = parse_tupletree(body if size is None else _chunked(body, size))
        assert got == _whole(body), desc


def _whole(body: bytes) -> tuple:
    import cim_provider.wbem.xmlparse as xp
    saved, xp.SLICE = xp.SLICE, 1 << 30
    try:
        return parse_tupletree(body)
    finally:
        xp.SLICE = saved


@pytest.mark.parametrize("cut", range(1, 9))
def test_a_doctype_split_between_chunks_is_refused(cut, monkeypatch):
    import cim_provider.wbem.xmlparse as xp
    monkeypatch.setattr(xp, "SLICE", 16)
    body = (b'<?xml version="1.0"?><!DOCTYPE CIM [<!ENTITY a "aaaa">]>'
            + imethodcall("EnumerateInstances")[21:])
    at = body.index(b"<!DOCTYPE") + cut
    for parts in ([body[:at], body[at:]], body):
        with pytest.raises(XMLRequestError, match="DOCTYPE"):
            parse_tupletree(parts)


@pytest.mark.parametrize("pad", [0, 40_000])
def test_parse_request_from_chunks_is_parse_request_from_bytes(pad):
    """http.py hands a large body over in the chunks it arrived in; a small one (the
    templates' size) is joined first. Either way the request is the one its bytes make."""
    params = '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="VIRT_X"/></IPARAMVALUE>' + "".join(
        f'<IPARAMVALUE NAME="P{i}"><VALUE>v{i}</VALUE></IPARAMVALUE>' for i in range(pad // 40))
    body = imethodcall("EnumerateInstanceNames", params)
    whole = parse_request(body)
    for size in (1000, 65536):
        got = parse_request(_chunked(body, size))
        assert (got.method, got.namespace, got.params.keys()) == \
            (whole.method, whole.namespace, whole.params.keys())
        assert got.params["ClassName"] == whole.params["ClassName"]
