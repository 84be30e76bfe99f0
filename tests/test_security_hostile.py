"""Hostile input (issue 5): XML tricks (DOCTYPE, external and nested entities), huge
attribute values, deep nesting, invalid UTF-8, wrong CIM-XML structure, every CIM type
with out-of-range and malformed values in method parameters and keys, and embedded
objects that are not instances. Each gets the right HTTP or CIM error; the server's
memory stays bounded and it answers a normal request afterwards.

Bounded time: every request has a client timeout well under the test timeout.
"""
from __future__ import annotations

import psutil
import pytest
import pywbem

try:
    from tests.support import secure as sec
    from tests.support import wbem_server as ws
except ImportError:
    from support import secure as sec  # type: ignore
    from support import wbem_server as ws  # type: ignore

pytestmark = pytest.mark.timeout(120)
H = sec.cim_headers
RSS_SLACK = 200 * 1024 * 1024     # generous: the test process hosts the server and clients


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = sec.SecureServer(tmp_path_factory.mktemp("hostile"))
    proc = psutil.Process()
    rss = proc.memory_info().rss
    yield srv
    # bounded memory: the whole module's abuse left the process within a fixed slack
    assert proc.memory_info().rss - rss < RSS_SLACK
    srv.stop()


def post(server, body, method="EnumerateInstanceNames", obj="root/virt", timeout=30):
    return sec.post(server.port, body, H(method, obj), timeout=timeout)


def expect_400(server, body, cim_error="request-not-well-formed", method="EnumerateInstanceNames"):
    status, headers, text = post(server, body, method)
    assert status == 400, text[:300]
    assert headers["CIMError"] == cim_error, text[:300]
    assert len(text) < 2000 and b"Traceback" not in text
    sec.assert_alive(server.port)
    return text


def expect_cim(server, body, codes, method, obj="root/virt"):
    status, _h, text = post(server, body, method, obj)
    assert status == 200, text[:300]
    code = sec.cim_error(text)
    assert code in codes, text[:500]
    assert len(text) < 4000, "the error echoed request content"
    sec.assert_alive(server.port)
    return text


# --- XML ---------------------------------------------------------------------------------

LAUGHS = ('<?xml version="1.0"?><!DOCTYPE CIM [<!ENTITY a "aaaaaaaaaa">'
          + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
                    for p, c in zip("abcdefgh", "bcdefghi"))
          + ']><CIM CIMVERSION="2.0" DTDVERSION="2.0">&i;</CIM>')


@pytest.mark.parametrize("body", [
    LAUGHS,                                                               # nested entities
    '<?xml version="1.0"?><!DOCTYPE CIM [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<CIM CIMVERSION="2.0" DTDVERSION="2.0">&x;</CIM>',                      # external entity
    '<?xml version="1.0"?><!DOCTYPE CIM [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x.dtd"> %p;]>'
    '<CIM/>',                                                             # parameter entity
    '<?xml version="1.0"?><!DOCTYPE CIM SYSTEM "file:///etc/passwd"><CIM/>',  # external DTD
    '<?xml version="1.0"?>\n  <!doctype CIM []><CIM/>',
], ids=["billion-laughs", "external-entity", "parameter-entity", "external-dtd", "lowercase"])
def test_doctype_and_entities_refused(server, body):
    text = expect_400(server, body)
    assert b"root:" not in text


def test_undeclared_entity_refused(server):
    expect_400(server, sec.ENUM_NAMES.replace("VIRT_ComputerSystem", "&passwd;"))


def test_doctype_hidden_in_utf16_refused(server):
    body = '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE CIM [<!ENTITY a "x">]><CIM>&a;</CIM>'
    expect_400(server, body.encode("utf-16"))


def test_huge_attribute_value(server):
    """A 12 MiB class name (under the 16 MiB body limit): a CIM error that does not
    echo it, in bounded memory."""
    body = sec.ENUM_NAMES.replace("VIRT_ComputerSystem", "C" * (12 * 1024 * 1024))
    expect_cim(server, body, {pywbem.CIM_ERR_INVALID_CLASS}, "EnumerateInstanceNames")


def test_huge_attribute_over_body_limit(server):
    body = sec.ENUM_NAMES.replace("VIRT_ComputerSystem", "C" * (17 * 1024 * 1024))
    status, _h, _t = post(server, body)
    assert status == 413
    sec.assert_alive(server.port)


def test_many_attributes(server):
    """100 000 attributes the DTD does not declare: not valid CIM-XML."""
    attrs = " ".join(f'a{i}="{i}"' for i in range(100_000))
    body = sec.ENUM_NAMES.replace('<CLASSNAME NAME=', f'<CLASSNAME {attrs} NAME=')
    expect_400(server, body, "request-not-valid")


def test_deep_nesting(server):
    body = sec.imethodcall("EnumerateInstanceNames",
                           "<X>" * 200_000 + "</X>" * 200_000)
    assert b"deeper than" in expect_400(server, body)


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                 b"\x00", b"\x01"])
def test_invalid_utf8_or_characters(server, bad):
    body = sec.ENUM_NAMES.encode().replace(b"VIRT_ComputerSystem", b"VIRT_" + bad + b"X")
    expect_400(server, body)


def test_invalid_utf8_in_text_content(server):
    body = sec.imethodcall("ExecQuery", '<IPARAMVALUE NAME="QueryLanguage"><VALUE>WQL</VALUE>'
                           '</IPARAMVALUE><IPARAMVALUE NAME="Query"><VALUE>SELECT * FROM X'
                           '\udcff</VALUE></IPARAMVALUE>').encode("utf-8", "surrogateescape")
    expect_400(server, body, method="ExecQuery")


# --- wrong CIM-XML structure --------------------------------------------------------------

NS = '<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virt"/></LOCALNAMESPACEPATH>'


def wrap(inner: str, message_attrs: str = 'ID="1" PROTOCOLVERSION="1.0"') -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE {message_attrs}>{inner}</MESSAGE></CIM>')


ENUM_CS = '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="VIRT_ComputerSystem"/></IPARAMVALUE>'

def case(desc, body, status, expected, method="EnumerateInstanceNames", obj="root/virt",
         marks=()):
    """One request and the one answer it must get: `expected` is the CIMError header of
    an HTTP 400 / 501, or the CODE of the ERROR element of an HTTP 200."""
    return pytest.param(body, status, expected, method, obj, id=desc, marks=marks)


# DSP0200: a body that is not well-formed XML, or not valid CIM-XML (the DTD, one simple
# request), is an HTTP 400 with a CIMError header; what the server does not implement is
# an HTTP 501; a valid request with a bad or unknown value is an HTTP 200 with an ERROR.
STRUCTURE_CASES = [
    case("no-namespace", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{ENUM_CS}'
                              f'</IMETHODCALL></SIMPLEREQ>'), 400, "request-not-valid"),
    case("two-namespaces", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}{NS}'
                                f'</IMETHODCALL></SIMPLEREQ>'), 400, "request-not-valid"),
    case("empty-simplereq", wrap('<SIMPLEREQ></SIMPLEREQ>'), 400, "request-not-valid"),
    case("two-calls", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}'
                           f'</IMETHODCALL><IMETHODCALL NAME="EnumerateInstanceNames">{NS}'
                           f'</IMETHODCALL></SIMPLEREQ>'), 400, "request-not-valid"),
    case("no-method-name", wrap(f'<SIMPLEREQ><IMETHODCALL>{NS}</IMETHODCALL></SIMPLEREQ>'),
         400, "request-not-valid"),
    case("no-param-name", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}'
                               f'<IPARAMVALUE><CLASSNAME NAME="X"/></IPARAMVALUE></IMETHODCALL>'
                               f'</SIMPLEREQ>'), 400, "request-not-valid"),
    case("property-without-name-and-type",
         wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}<IPARAMVALUE '
              f'NAME="ClassName"><INSTANCE CLASSNAME="X"><PROPERTY/></INSTANCE></IPARAMVALUE>'
              f'</IMETHODCALL></SIMPLEREQ>'), 400, "request-not-valid"),
    case("methodcall-no-target", wrap('<SIMPLEREQ><METHODCALL NAME="Echo"></METHODCALL>'
                                      '</SIMPLEREQ>'), 400, "request-not-valid", "Echo"),
    case("instancename-no-classname",
         wrap(f'<SIMPLEREQ><METHODCALL NAME="Echo"><LOCALINSTANCEPATH>{NS}<INSTANCENAME>'
              f'<KEYBINDING NAME="Id"><KEYVALUE>1</KEYVALUE></KEYBINDING></INSTANCENAME>'
              f'</LOCALINSTANCEPATH></METHODCALL></SIMPLEREQ>'), 400, "request-not-valid",
         "Echo"),
    case("keybinding-no-value",
         wrap(f'<SIMPLEREQ><METHODCALL NAME="Echo"><LOCALINSTANCEPATH>{NS}<INSTANCENAME '
              f'CLASSNAME="VIRT_TestAllTypes"><KEYBINDING NAME="Id"></KEYBINDING></INSTANCENAME>'
              f'</LOCALINSTANCEPATH></METHODCALL></SIMPLEREQ>'), 400, "request-not-valid",
         "Echo"),
    case("bad-valuetype",
         wrap(f'<SIMPLEREQ><IMETHODCALL NAME="GetInstance">{NS}<IPARAMVALUE NAME="InstanceName">'
              f'<INSTANCENAME CLASSNAME="VIRT_TestKeys"><KEYBINDING NAME="KStr"><KEYVALUE '
              f'VALUETYPE="bogus">1</KEYVALUE></KEYBINDING></INSTANCENAME></IPARAMVALUE>'
              f'</IMETHODCALL></SIMPLEREQ>'), 400, "request-not-valid", "GetInstance"),
    case("message-no-id",
         wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}{ENUM_CS}'
              f'</IMETHODCALL></SIMPLEREQ>', 'PROTOCOLVERSION="1.0"'), 400, "request-not-valid"),
    case("response-as-request", wrap('<SIMPLERSP><IMETHODRESPONSE NAME="X"/></SIMPLERSP>'),
         400, "request-not-valid"),
    case("not-cim", '<?xml version="1.0"?><NOTCIM/>', 400, "request-not-valid"),
    case("no-message", '<?xml version="1.0"?><CIM CIMVERSION="2.0" DTDVERSION="2.0"></CIM>',
         400, "request-not-valid"),
    case("unclosed-element", sec.ENUM_NAMES.replace("</SIMPLEREQ>", ""),
         400, "request-not-well-formed"),
    case("header-names-another-method", sec.ENUM_NAMES, 400, "header-mismatch", "GetInstance"),
    case("header-names-another-namespace", sec.ENUM_NAMES, 400, "header-mismatch",
         obj="root/interop"),
    case("multireq", wrap('<MULTIREQ>' + f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">'
                          f'{NS}{ENUM_CS}</IMETHODCALL></SIMPLEREQ>' * 2 + '</MULTIREQ>'),
         501, "multiple-requests-unsupported"),
    case("protocol-version-2", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}'
                                    f'{ENUM_CS}</IMETHODCALL></SIMPLEREQ>',
                                    'ID="1" PROTOCOLVERSION="2.0"'),
         501, "unsupported-protocol-version"),
    # well-formed and valid: the values are what is wrong
    case("instance-as-classname",
         wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}<IPARAMVALUE '
              f'NAME="ClassName"><INSTANCE CLASSNAME="X"><PROPERTY NAME="p" TYPE="string"/>'
              f'</INSTANCE></IPARAMVALUE></IMETHODCALL></SIMPLEREQ>'),
         200, pywbem.CIM_ERR_INVALID_PARAMETER),
    case("classname-missing", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="EnumerateInstanceNames">{NS}'
                                   f'</IMETHODCALL></SIMPLEREQ>'),
         200, pywbem.CIM_ERR_INVALID_PARAMETER),
    case("unknown-parameter", sec.ENUM_NAMES.replace(
        "</IMETHODCALL>", '<IPARAMVALUE NAME="Bogus"><VALUE>1</VALUE></IPARAMVALUE></IMETHODCALL>'),
        200, pywbem.CIM_ERR_INVALID_PARAMETER),
    case("duplicate-parameter", sec.ENUM_NAMES.replace("</IMETHODCALL>", ENUM_CS.replace(
        "ClassName", "classname") + "</IMETHODCALL>"), 200, pywbem.CIM_ERR_INVALID_PARAMETER),
    case("unknown-intrinsic-method", wrap(f'<SIMPLEREQ><IMETHODCALL NAME="NoSuchOperation">{NS}'
                                          f'</IMETHODCALL></SIMPLEREQ>'),
         200, pywbem.CIM_ERR_NOT_SUPPORTED, "NoSuchOperation"),
    case("unknown-namespace", sec.ENUM_NAMES.replace('NAME="virt"', 'NAME="nowhere"'),
         200, pywbem.CIM_ERR_INVALID_NAMESPACE, obj="root/nowhere"),
]


@pytest.mark.parametrize("body,status,expected,method,obj", STRUCTURE_CASES)
def test_wrong_structure(server, body, status, expected, method, obj):
    got, headers, text = post(server, body, method, obj)
    if status == 200:
        answer = (got, headers.get("CIMError"), sec.cim_error(text))
        assert answer == (200, None, expected), text[:300]
    else:
        answer = (got, headers.get("CIMError"))
        assert answer == (status, expected), text[:300]
        assert b"<ERROR" not in text
    assert len(text) < 4000 and b"Traceback" not in text
    sec.assert_alive(server.port)


# --- every CIM type, out of range and malformed ----------------------------------------------

BAD_VALUES = {
    "uint8": ["300", "-1", "abc", "1.5", "", "0x100", " 1 2"],
    "uint16": ["65536", "-1", "1e3"],
    "uint32": ["4294967296", "-5"],
    "uint64": ["18446744073709551616", "-1", "9" * 400],
    "sint8": ["-129", "128", "x"],
    "sint16": ["32768", "-32769"],
    "sint32": ["2147483648", "-2147483649"],
    "sint64": ["9223372036854775808", "-9223372036854775809"],
    "real32": ["abc", "", "1.0.0", "0x1p3x", "1e39"],
    "real64": ["abc", "--1", "nan("],
    "boolean": ["maybe", "1", "", "yes"],
    "char16": ["ab", ""],
    "datetime": ["garbage", "20241301000000.000000+000", "2024", "", "99999999999999.999999+999x"],
}
CASES = [(t, v) for t, vs in BAD_VALUES.items() for v in vs]
ECHO = '<CLASSNAME NAME="VIRT_TestAllTypes"/>'


def echo_call(params: str) -> str:
    return sec.methodcall("Echo", ECHO, params)


def _esc(v: str) -> str:
    return v.replace("&", "&amp;").replace("<", "&lt;")


@pytest.mark.parametrize("cimtype,value", CASES)
@pytest.mark.parametrize("typed", [True, False], ids=["paramtype", "untyped"])
def test_method_parameter_bad_values(server, cimtype, value, typed):
    """With PARAMTYPE (as pywbem sends) and without (as wbemcli sends)."""
    pt = f' PARAMTYPE="{cimtype}"' if typed else ""
    calls = len(server.providers["alltypes"].calls)
    for params in (f'<PARAMVALUE NAME="In_{cimtype}"{pt}><VALUE>{_esc(value)}</VALUE></PARAMVALUE>',
                   f'<PARAMVALUE NAME="InA_{cimtype}"{pt}><VALUE.ARRAY><VALUE>1</VALUE>'
                   f'<VALUE>{_esc(value)}</VALUE></VALUE.ARRAY></PARAMVALUE>'):
        # a valid request with a bad value: HTTP 200 and an ERROR (DSP0200), never a 400
        status, headers, text = post(server, echo_call(params), "Echo",
                                     "root/virt:VIRT_TestAllTypes")
        assert (status, headers.get("CIMError"), sec.cim_error(text)) == \
            (200, None, pywbem.CIM_ERR_INVALID_PARAMETER), (cimtype, value, text[:400])
    assert len(server.providers["alltypes"].calls) == calls, "a bad value reached the provider"
    sec.assert_alive(server.port)


def test_real_overflow_untyped(server):
    """Without PARAMTYPE the dispatcher sees the text: 1e400 is not a real64. (With
    PARAMTYPE, pywbem's parser has already turned it into infinity.)"""
    for t, v in (("real64", "1e400"), ("real64", "-1e999"), ("real32", "1e39")):
        params = f'<PARAMVALUE NAME="In_{t}"><VALUE>{v}</VALUE></PARAMVALUE>'
        expect_cim(server, echo_call(params), {pywbem.CIM_ERR_INVALID_PARAMETER}, "Echo",
                   "root/virt:VIRT_TestAllTypes")
    params = '<PARAMVALUE NAME="In_real64"><VALUE>-INF</VALUE></PARAMVALUE>'
    status, _h, text = post(server, echo_call(params), "Echo", "root/virt:VIRT_TestAllTypes")
    assert status == 200 and sec.cim_error(text) is None and b"In_real64=Real64:-inf" in text


@pytest.mark.parametrize("params", [
    pytest.param('<PARAMVALUE NAME="In_uint8"><VALUE.ARRAY><VALUE>1</VALUE></VALUE.ARRAY>'
                 '</PARAMVALUE>', id="array-for-scalar"),
    pytest.param('<PARAMVALUE NAME="In_ref"><VALUE>not a reference</VALUE></PARAMVALUE>',
                 id="string-for-reference"),
    pytest.param('<PARAMVALUE NAME="In_string"><VALUE.REFERENCE><CLASSNAME NAME="X"/>'
                 '</VALUE.REFERENCE></PARAMVALUE>', id="reference-for-string"),
    pytest.param('<PARAMVALUE NAME="In_boolean"><VALUE>true</VALUE></PARAMVALUE>'
                 '<PARAMVALUE NAME="in_BOOLEAN"><VALUE>false</VALUE></PARAMVALUE>',
                 id="duplicate-parameter"),
    pytest.param('<PARAMVALUE NAME="Out_echo"><VALUE>x</VALUE></PARAMVALUE>',
                 id="output-parameter-given"),
    pytest.param('<PARAMVALUE NAME="NoSuchParam"><VALUE>x</VALUE></PARAMVALUE>',
                 id="unknown-parameter"),
])
def test_method_parameter_wrong_shapes(server, params):
    """Valid CIM-XML whose parameters do not fit the method: HTTP 200 with an ERROR."""
    calls = len(server.providers["alltypes"].calls)
    status, headers, text = post(server, echo_call(params), "Echo", "root/virt:VIRT_TestAllTypes")
    assert (status, headers.get("CIMError"), sec.cim_error(text)) == \
        (200, None, pywbem.CIM_ERR_INVALID_PARAMETER), text[:300]
    assert len(server.providers["alltypes"].calls) == calls, "a bad call reached the provider"


def test_good_values_still_accepted(server):
    """The same path with valid values of every type reaches the provider."""
    good = {"uint8": "255", "uint16": "0x10", "uint32": "7", "uint64": "18446744073709551615",
            "sint8": "-128", "sint16": "-1", "sint32": "5", "sint64": "-9223372036854775808",
            "real32": "1.5", "real64": "-2.5e10", "boolean": "TRUE", "char16": "é",
            "datetime": "20240102030405.000000+000"}
    params = "".join(f'<PARAMVALUE NAME="In_{t}"><VALUE>{v}</VALUE></PARAMVALUE>'
                     for t, v in good.items())
    status, _h, text = post(server, echo_call(params), "Echo", "root/virt:VIRT_TestAllTypes")
    assert status == 200 and sec.cim_error(text) is None, text[:500]
    assert b'<RETURNVALUE PARAMTYPE="uint32"><VALUE>13</VALUE>' in text


KEY_CASES = [("KU16", "numeric", "70000"), ("KU16", "numeric", "-1"),
             ("KU16", "numeric", "abc"),
             ("KU16", "string", "x7"), ("KS64", "numeric", "9223372036854775808"),
             ("KS64", "numeric", "1.5"),
             ("KBool", "boolean", "maybe"),
             ("KBool", "string", "maybe"), ("KStr", "numeric", "1")]


@pytest.mark.parametrize("key,valuetype,value", KEY_CASES)
def test_bad_key_values(server, key, valuetype, value):
    keys = {"KStr": ("string", "a"), "KU16": ("numeric", "7"), "KS64": ("numeric", "-5"),
            "KBool": ("boolean", "true")}
    keys[key] = (valuetype, value)
    kb = "".join(f'<KEYBINDING NAME="{k}"><KEYVALUE VALUETYPE="{vt}">{v}</KEYVALUE></KEYBINDING>'
                 for k, (vt, v) in keys.items())
    body = sec.imethodcall("GetInstance", f'<IPARAMVALUE NAME="InstanceName"><INSTANCENAME '
                           f'CLASSNAME="VIRT_TestKeys">{kb}</INSTANCENAME></IPARAMVALUE>')
    status, headers, text = post(server, body, "GetInstance")
    # docs/architecture.md "Errors": bad keys are CIM_ERR_NOT_FOUND, in an HTTP 200 (DSP0200)
    assert (status, headers.get("CIMError"), sec.cim_error(text)) == \
        (200, None, pywbem.CIM_ERR_NOT_FOUND), text[:300]
    sec.assert_alive(server.port)


def test_good_key_values_found(server):
    conn = server.conn()
    inst = conn.GetInstance(ws.keys_path("b&<c>", 65535, 2**62, True))
    assert inst["Value"] == "value-2"


# --- embedded objects that are not instances -----------------------------------------------

def _virt_model(repo):
    from cim_provider.inventory.inventory import Inventory
    from cim_provider.providers import Backend, virt_providers
    return {p.__class__.__name__ + str(i): p for i, p in enumerate(
        virt_providers(Backend(repo, Inventory(), ws.TEST_HOST)))}


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    srv = sec.SecureServer(tmp_path_factory.mktemp("embedded"), providers_factory=_virt_model)
    yield srv
    srv.stop()


VSSD = "VIRT_VirtualSystemSettingData"
NOT_INSTANCES = [
    f'<CLASS NAME="{VSSD}"></CLASS>',
    f"class {VSSD} : CIM_VirtualSystemSettingData {{ string X; }};",
    f'<VALUE>instance of {VSSD}</VALUE>',
    f'<INSTANCENAME CLASSNAME="{VSSD}"/>',
    "<!DOCTYPE x [<!ENTITY a 'b'>]><INSTANCE CLASSNAME=\"VIRT_VirtualSystemSettingData\"/>",
    "instance of NoSuchClass { };",
    f"instance of {VSSD} {{ NoSuchProperty = 1; }};",
    "instance of CIM_ManagedElement { };",            # an instance, but of the wrong class
    "garbage {{{{",
    "   ",
    "<" * 10000,
    "x" * (2 * 1024 * 1024),
]


@pytest.mark.parametrize("value", NOT_INSTANCES, ids=[f"case{i}" for i in range(len(NOT_INSTANCES))])
def test_embedded_objects_that_are_not_instances(model_server, value):
    conn = model_server.conn()
    vsms = pywbem.CIMInstanceName("VIRT_VirtualSystemManagementService", {
        "SystemCreationClassName": "VIRT_HostSystem", "SystemName": ws.TEST_HOST,
        "CreationClassName": "VIRT_VirtualSystemManagementService",
        "Name": "VirtualSystemManagementService"}, namespace="root/virt")
    with pytest.raises(pywbem.CIMError) as exc:
        conn.InvokeMethod("DefineSystem", vsms, SystemSettings=value)
    assert exc.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER, exc.value
    assert len(exc.value.status_description or "") < 1000
    with pytest.raises(pywbem.CIMError) as exc:
        conn.InvokeMethod("DefineSystem", vsms, SystemSettings=f"instance of {VSSD} {{ }};",
                          ResourceSettings=[value])
    assert exc.value.status_code in (pywbem.CIM_ERR_INVALID_PARAMETER, pywbem.CIM_ERR_FAILED), \
        exc.value    # FAILED: valid VSSD, then no Manager to define it with
    assert conn.EnumerateInstanceNames("VIRT_HostSystem")


# --- found by tests/test_fuzz.py -------------------------------------------------------------

def test_unknown_xml_encoding(server):
    expect_400(server, sec.ENUM_NAMES.replace('encoding="utf-8"', 'encoding="maybe"'))


def test_body_starting_with_m_post_is_a_body(server):
    """A POST whose body starts with "M-POST " sent after its head: the body is not a new
    request (it used to switch parsers mid-request and hang until the read timeout)."""
    import socket
    import time
    body = b"M-POST " + sec.ENUM_NAMES.encode()
    head = (f"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
            f"CIMOperation: MethodCall\r\nCIMMethod: EnumerateInstanceNames\r\n"
            f"CIMObject: root/virt\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        time.sleep(0.2)                   # head and body in separate reads on the server
        s.sendall(body)
        reply = s.recv(65536)             # socket timeout 10 s: a hang fails here
    assert reply.startswith(b"HTTP/1.1 400") and b"request-not-well-formed" in reply, reply[:300]
    sec.assert_alive(server.port)


@pytest.mark.parametrize("framing", [
    b"Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n",          # CL + TE: smuggling
    b"Content-Length: {n}\r\nContent-Length: {m}\r\n",                 # two lengths
    b"Content-Length: -1\r\n",
    b"Content-Length: 1e3\r\n",
    b"Transfer-Encoding: gzip, chunked, identity\r\n",
], ids=["cl-and-te", "two-lengths", "negative", "not-a-number", "odd-te"])
def test_ambiguous_framing_refused(server, framing):
    import socket
    body = sec.ENUM_NAMES.encode()
    framing = framing.replace(b"{n}", str(len(body)).encode()).replace(
        b"{m}", str(len(body) + 5).encode())
    head = (b"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
            b"CIMOperation: MethodCall\r\nCIMMethod: EnumerateInstanceNames\r\n"
            b"CIMObject: root/virt\r\n" + framing + b"\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        reply = sec.read_until_closed(s)
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400", b"HTTP/1.1 501")), reply[:200]
    assert reply.count(b"HTTP/1.") == 1          # nothing was parsed as a second request
    sec.assert_alive(server.port)
