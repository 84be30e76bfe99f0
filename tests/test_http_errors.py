"""Malformed input over raw HTTP (http.client / sockets) against the real server.

Each case gets the right HTTP status and `CIMError` header, or a CIM error in a 200;
never a 500 or a traceback; error descriptions never echo large request content; and
the server answers a normal request afterwards.
"""
from __future__ import annotations

import http.client
import socket
import time

import pytest
from pywbem._tupleparse import TupleParser

from cim_provider.wbem.xmlparse import parse_tupletree

try:
    from tests.support import wbem_server as ws
except ImportError:
    from support import wbem_server as ws

pytestmark = pytest.mark.timeout(120)


def imethodcall(method: str, params: str = "", ns: str = "interop", msg_id: str = "42") -> str:
    nsx = "".join(f'<NAMESPACE NAME="{p}"></NAMESPACE>' for p in ns.split("/"))
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{msg_id}" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            f'<IMETHODCALL NAME="{method}"><LOCALNAMESPACEPATH>{nsx}</LOCALNAMESPACEPATH>'
            f'{params}</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>')


def methodcall(method: str, classname: str, params: str = "", ns: str = "interop") -> str:
    nsx = "".join(f'<NAMESPACE NAME="{p}"></NAMESPACE>' for p in ns.split("/"))
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="43" PROTOCOLVERSION="1.0"><SIMPLEREQ><METHODCALL NAME="{method}">'
            f'<LOCALCLASSPATH><LOCALNAMESPACEPATH>{nsx}</LOCALNAMESPACEPATH>'
            f'<CLASSNAME NAME="{classname}"></CLASSNAME></LOCALCLASSPATH>{params}'
            f'</METHODCALL></SIMPLEREQ></MESSAGE></CIM>')


ENUM_NAMES = imethodcall("EnumerateInstanceNames", '<IPARAMVALUE NAME="ClassName">'
                         '<CLASSNAME NAME="CIM_Namespace"></CLASSNAME></IPARAMVALUE>')


def headers_for(method: str, obj: str = "interop", **extra) -> dict[str, str]:
    h = {"Content-Type": 'application/xml; charset="utf-8"', "CIMOperation": "MethodCall",
         "CIMMethod": method, "CIMObject": obj, "CIMProtocolVersion": "1.0"}
    for k, v in extra.items():
        k = k.replace("_", "-")
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    return h


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def cim_error(self) -> tuple[int, str] | None:
        """(CODE, DESCRIPTION) of an ERROR in a 200 response, or None."""
        tree = parse_tupletree(self.body)
        rsp = tree[2][0][2][0][2][0]
        for kid in rsp[2]:
            if isinstance(kid, tuple) and kid[0] == "ERROR":
                return int(kid[1]["CODE"]), kid[1]["DESCRIPTION"]
        return None

    def imethodresponse(self) -> tuple:
        tree = parse_tupletree(self.body)
        return tree[2][0][2][0][2][0]


def send(port: int, body: bytes | str, headers: dict[str, str], method: str = "POST",
         path: str = "/cimom") -> Response:
    if isinstance(body, str):
        body = body.encode("utf-8")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def check_sane(resp: Response) -> None:
    assert resp.status != 500
    assert "Traceback" not in resp.text and 'File "' not in resp.text


def assert_alive(port: int) -> None:
    resp = send(port, ENUM_NAMES, headers_for("EnumerateInstanceNames"))
    assert resp.status == 200, resp.text
    assert resp.cim_error() is None
    assert resp.text.count("<INSTANCENAME ") == 2


@pytest.fixture(scope="module")
def port(subprocess_server):
    return subprocess_server.port


def test_normal_request(port):
    resp = send(port, ENUM_NAMES, headers_for("EnumerateInstanceNames"))
    assert resp.status == 200
    assert resp.headers["CIMOperation"] == "MethodResponse"
    assert resp.headers["Content-Type"].startswith("application/xml")
    assert resp.text.startswith('<?xml version="1.0" encoding="utf-8" ?>')
    assert "/>" not in resp.text


# --- XML problems: 400 request-not-well-formed ----------------------------------------

TRUNCATED = ENUM_NAMES[:len(ENUM_NAMES) // 2]
DOCTYPE = ('<?xml version="1.0"?><!DOCTYPE CIM SYSTEM "http://www.dmtf.org/cim/mapping/xml/'
           'v2.0/cim_dtd_v20.dtd">' + ENUM_NAMES.split("?>", 1)[1])
BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
              for i in range(1, 10))
    + ']>' + ENUM_NAMES.split("?>", 1)[1].replace("CIM_Namespace", "&lol9;"))
EXTERNAL_ENTITY = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
                   + ENUM_NAMES.split("?>", 1)[1].replace("CIM_Namespace", "&xxe;"))


@pytest.mark.parametrize("body,reason", [
    (TRUNCATED, "malformed XML"),
    (DOCTYPE, "DOCTYPE"),
    (EXTERNAL_ENTITY, "DOCTYPE"),
    ("", "malformed XML"),
    ("\xff\xfe garbage \x00", "malformed XML"),
    (ENUM_NAMES.replace("CIM_Namespace", "a&b"), "malformed XML"),
], ids=["truncated", "doctype", "external-entity", "empty", "garbage", "unescaped-amp"])
def test_not_well_formed(port, body, reason):
    resp = send(port, body, headers_for("EnumerateInstanceNames"))
    check_sane(resp)
    assert resp.status == 400
    assert resp.headers["CIMError"] == "request-not-well-formed"
    assert reason in resp.text
    assert len(resp.body) < 500
    assert_alive(port)


@pytest.mark.timeout(15)
def test_billion_laughs_refused_at_once(port):
    resp = send(port, BILLION_LAUGHS, headers_for("EnumerateInstanceNames"))
    assert resp.status == 400
    assert resp.headers["CIMError"] == "request-not-well-formed"
    assert "DOCTYPE" in resp.text
    assert_alive(port)


@pytest.mark.timeout(90)
def test_many_entity_references_answered(port):
    """A 7.5 MB request of &amp; references in text is answered (linear parsing),
    with a short description; not refused for its size."""
    n = 7_500_000 // 5
    body = imethodcall("GetQualifier", '<IPARAMVALUE NAME="QualifierName"><VALUE>'
                       + "&amp;" * n + "</VALUE></IPARAMVALUE>")
    assert len(body) > 7_500_000
    resp = send(port, body, headers_for("GetQualifier"))
    check_sane(resp)
    assert resp.status == 200
    code, desc = resp.cim_error()
    assert code == 6                                    # CIM_ERR_NOT_FOUND
    assert len(desc) < 300 and len(resp.body) < 2000
    assert_alive(port)


# --- size limits ------------------------------------------------------------------------

def _raw(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send raw bytes; read until the server closes or answers completely."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_body_over_limit_by_content_length(port):
    head = ("POST /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/xml\r\nCIMOperation: MethodCall\r\n"
            "CIMMethod: EnumerateInstanceNames\r\nCIMObject: interop\r\n"
            f"Content-Length: {17 * 1024 * 1024}\r\n\r\n").encode()
    data = _raw(port, head, b"<CIM>" * 100)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert_alive(port)


@pytest.fixture
def small_server():
    from cim_provider.server.http import HTTPLimits
    srv = ws.InProcessServer(ws.make_test_providers, limits=HTTPLimits(max_body=100_000))
    yield srv
    srv.stop()


def test_chunked_body_over_limit(small_server):
    conn = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=30)

    def chunks():                     # no Content-Length: the limit applies while reading
        for _ in range(20):
            yield b"<!-- " + b"x" * 10_000 + b" -->"

    try:
        conn.request("POST", "/cimom", chunks(), headers_for("EnumerateInstanceNames"),
                     encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 413
    resp = send(small_server.port, ENUM_NAMES, headers_for("EnumerateInstanceNames"))
    assert resp.status == 200


def test_body_under_small_limit_served(small_server):
    body = imethodcall("EnumerateInstanceNames", '<IPARAMVALUE NAME="ClassName">'
                       '<CLASSNAME NAME="CIM_ComputerSystem"></CLASSNAME></IPARAMVALUE>',
                       ns="root/virt")
    resp = send(small_server.port, body, headers_for("EnumerateInstanceNames", "root/virt"))
    assert resp.status == 200 and resp.text.count("<INSTANCENAME ") == 4


# --- headers -----------------------------------------------------------------------------

@pytest.mark.parametrize("hdrs,status,cim_error", [
    ({"CIMOperation": "MethodResponse"}, 400, "unsupported-operation"),
    ({"CIMOperation": None}, 400, "unsupported-operation"),
    ({"CIMMethod": None}, 400, "header-mismatch"),
    ({"CIMMethod": "GetInstance"}, 400, "header-mismatch"),
    ({"CIMObject": None}, 400, "header-mismatch"),
    ({"CIMObject": "root/virt"}, 400, "header-mismatch"),
    ({"CIMProtocolVersion": "2.0"}, 501, "unsupported-protocol-version"),
], ids=["wrong-operation", "no-operation", "no-method", "method-mismatch", "no-object",
        "object-mismatch", "protocol-version"])
def test_header_errors(port, hdrs, status, cim_error):
    resp = send(port, ENUM_NAMES, headers_for("EnumerateInstanceNames", **hdrs))
    check_sane(resp)
    assert resp.status == status, resp.text
    assert resp.headers["CIMError"] == cim_error
    assert_alive(port)


@pytest.mark.parametrize("obj", ["interop", "INTEROP", "%2Finterop", "interop%2F"],
                         ids=["plain", "case", "escaped-slash", "trailing"])
def test_cimobject_forms_accepted(port, obj):
    resp = send(port, ENUM_NAMES, headers_for("enumerateinstancenames", obj))
    assert resp.status == 200, resp.text


def test_cimobject_url_escaped_for_method_call(inproc_server):
    """wbemcli: `CIMObject: root%2Fvirt%3A<path>` for a METHODCALL."""
    body = methodcall("Echo", ws.ALLTYPES_CLASS, '<PARAMVALUE NAME="In_uint8"><VALUE>7'
                      '</VALUE></PARAMVALUE>', ns="root/virt")
    resp = send(inproc_server.port, body,
                headers_for("Echo", "root%2Fvirt%3AVIRT_TestAllTypes"))
    assert resp.status == 200, resp.text
    assert resp.cim_error() is None
    assert '<RETURNVALUE PARAMTYPE="uint32"><VALUE>1</VALUE></RETURNVALUE>' in resp.text
    _t, _m, params = inproc_server.providers["alltypes"].calls[-1]
    assert params == {"In_uint8": 7}


def test_response_name_echoes_request_case(port):
    body = ENUM_NAMES.replace('NAME="EnumerateInstanceNames"', 'NAME="enumerateINSTANCEnames"')
    resp = send(port, body, headers_for("enumerateINSTANCEnames"))
    assert resp.status == 200
    rsp = resp.imethodresponse()
    assert rsp[0] == "IMETHODRESPONSE" and rsp[1] == {"NAME": "enumerateINSTANCEnames"}
    assert 'MESSAGE ID="42"' in resp.text


def test_m_post_with_numbered_headers(port):
    h = {"Content-Type": 'application/xml; charset="utf-8"',
         "Man": "http://www.dmtf.org/cim/mapping.http/v1.0 ; ns=73",
         "73-CIMOperation": "MethodCall", "73-CIMMethod": "EnumerateInstanceNames",
         "73-CIMObject": "interop", "73-CIMProtocolVersion": "1.0"}
    resp = send(port, ENUM_NAMES, h, method="M-POST")
    assert resp.status == 200, resp.text
    assert resp.headers["73-CIMOperation"] == "MethodResponse"
    assert "Ext" in resp.headers
    assert resp.text.count("<INSTANCENAME ") == 2
    # a header error is reported with the same prefix
    h["73-CIMMethod"] = "GetClass"
    resp = send(port, ENUM_NAMES, h, method="M-POST")
    assert resp.status == 400 and resp.headers["73-CIMError"] == "header-mismatch"


@pytest.mark.parametrize("split", [1, 4, 6, 7, 30], ids=lambda n: f"first {n} bytes alone")
def test_m_post_split_across_segments(port, split):
    """An M-POST whose first line arrives in pieces is still an M-POST."""
    body = ENUM_NAMES.encode()
    head = ("M-POST /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            'Content-Type: application/xml; charset="utf-8"\r\n'
            "Man: http://www.dmtf.org/cim/mapping.http/v1.0 ; ns=73\r\n"
            "73-CIMOperation: MethodCall\r\n73-CIMMethod: EnumerateInstanceNames\r\n"
            f"73-CIMObject: interop\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head[:split])
        time.sleep(0.05)              # let the first piece arrive on its own
        sock.sendall(head[split:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b"73-CIMOperation: MethodResponse" in rest
    assert rest.count(b"<INSTANCENAME ") == 2
    assert_alive(port)


def test_m_post_without_man_header(port):
    resp = send(port, ENUM_NAMES, headers_for("EnumerateInstanceNames"), method="M-POST")
    check_sane(resp)
    assert resp.status == 400 and resp.headers["CIMError"] == "unsupported-operation"
    assert_alive(port)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_http_methods(port, method):
    resp = send(port, b"", {}, method=method)
    check_sane(resp)
    assert resp.status == 405
    assert "POST" in resp.headers.get("Allow", "")
    assert_alive(port)


def test_unknown_path(port):
    resp = send(port, ENUM_NAMES, headers_for("EnumerateInstanceNames"), path="/nowhere")
    assert resp.status == 404
    assert_alive(port)


def test_m_post_after_post_on_one_connection(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    mpost = {"Content-Type": 'application/xml; charset="utf-8"',
             "Man": "http://www.dmtf.org/cim/mapping.http/v1.0;ns=11",
             "11-CIMOperation": "MethodCall", "11-CIMMethod": "EnumerateInstanceNames",
             "11-CIMObject": "interop"}
    try:
        for method, hdrs in [("POST", headers_for("EnumerateInstanceNames")), ("M-POST", mpost),
                             ("POST", headers_for("EnumerateInstanceNames"))]:
            conn.request(method, "/cimom", ENUM_NAMES.encode(), hdrs)
            resp = conn.getresponse()
            assert resp.status == 200, (method, resp.read())
            assert resp.read().count(b"<INSTANCENAME ") == 2
            prefix = "11-" if method == "M-POST" else ""
            assert resp.getheader(prefix + "CIMOperation") == "MethodResponse"
    finally:
        conn.close()


def test_keep_alive(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(3):
            conn.request("POST", "/cimom", ENUM_NAMES.encode(),
                         headers_for("EnumerateInstanceNames"))
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read().count(b"<INSTANCENAME ") == 2
            assert resp.getheader("Connection", "").lower() != "close"
        sock = conn.sock
        assert sock is not None                 # the same connection served all three
    finally:
        conn.close()


# --- CIM errors in a 200 -----------------------------------------------------------------

def cim_error_of(port: int, body: str, cimmethod: str, obj: str = "interop") -> tuple[int, str]:
    resp = send(port, body, headers_for(cimmethod, obj))
    check_sane(resp)
    assert resp.status == 200, resp.text
    err = resp.cim_error()
    assert err is not None, resp.text
    assert len(err[1]) < 1000
    assert_alive(port)
    return err


def test_methodcall_unknown_method(port):
    code, desc = cim_error_of(port, methodcall("NoSuchMethod", "CIM_ObjectManager"),
                              "NoSuchMethod")
    assert code == 17 and "NoSuchMethod" in desc             # CIM_ERR_METHOD_NOT_FOUND


def test_methodcall_unknown_class(port):
    code, _ = cim_error_of(port, methodcall("M", "CIM_NoSuchClass"), "M")
    assert code == 5


def test_unknown_intrinsic_method(port):
    code, _ = cim_error_of(port, imethodcall("FrobnicateInstances"), "FrobnicateInstances")
    assert code == 7                                         # CIM_ERR_NOT_SUPPORTED


@pytest.mark.parametrize("params", [
    '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_Namespace"></CLASSNAME></IPARAMVALUE>'
    '<IPARAMVALUE NAME="DeepInheritance"><VALUE>maybe</VALUE></IPARAMVALUE>',
    '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_Namespace"></CLASSNAME></IPARAMVALUE>'
    '<IPARAMVALUE NAME="PropertyList"><CLASSNAME NAME="X"></CLASSNAME></IPARAMVALUE>',
    '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_Namespace"></CLASSNAME></IPARAMVALUE>'
    '<IPARAMVALUE NAME="NoSuchParameter"><VALUE>1</VALUE></IPARAMVALUE>',
    '',
    '<IPARAMVALUE NAME="ClassName"><INSTANCENAME CLASSNAME="CIM_Namespace"></INSTANCENAME>'
    '</IPARAMVALUE>',
], ids=["bad-boolean", "bad-property-list", "unknown-parameter", "missing-classname",
        "instancename-for-classname"])
def test_intrinsic_parameter_errors(port, params):
    code, _ = cim_error_of(port, imethodcall("EnumerateInstances", params), "EnumerateInstances")
    assert code == 4                                         # CIM_ERR_INVALID_PARAMETER


@pytest.mark.parametrize("params", [
    '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_Namespace"></CLASSNAME></IPARAMVALUE>'
    '<IPARAMVALUE NAME="MaxObjectCount"><VALUE>many</VALUE></IPARAMVALUE>',
    '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_Namespace"></CLASSNAME></IPARAMVALUE>'
    '<IPARAMVALUE NAME="OperationTimeout"><VALUE>-5</VALUE></IPARAMVALUE>',
], ids=["bad-max-count", "negative-timeout"])
def test_pull_parameter_errors(port, params):
    code, _ = cim_error_of(port, imethodcall("OpenEnumerateInstances", params),
                           "OpenEnumerateInstances")
    assert code == 4


def test_method_parameter_of_wrong_type(inproc_server):
    body = methodcall("Echo", ws.ALLTYPES_CLASS, '<PARAMVALUE NAME="In_sint16"><VALUE>'
                      'forty-two</VALUE></PARAMVALUE>', ns="root/virt")
    code, desc = cim_error_of(inproc_server.port, body, "Echo", "root/virt")
    assert code == 4 and "In_sint16" in desc


BIG = "X" * 200_000
MID = "Y" * 8_000          # fits aiohttp's 8190-byte header line limit (CIMMethod header)


@pytest.mark.parametrize("body,cimmethod", [
    (imethodcall("EnumerateInstances", f'<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="{BIG}">'
                 '</CLASSNAME></IPARAMVALUE>'), "EnumerateInstances"),
    (imethodcall("GetClass", f'<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="{BIG}">'
                 '</CLASSNAME></IPARAMVALUE>'), "GetClass"),
    (imethodcall("EnumerateInstances", f'<IPARAMVALUE NAME="{BIG}"><VALUE>1</VALUE>'
                 '</IPARAMVALUE>'), "EnumerateInstances"),
    (imethodcall(MID), MID),
    (methodcall(MID, "CIM_ObjectManager"), MID),
    (imethodcall(BIG), "EnumerateInstances"),
    (methodcall("M", BIG), "M"),
    (imethodcall("GetInstance", '<IPARAMVALUE NAME="InstanceName"><INSTANCENAME '
                 f'CLASSNAME="CIM_Namespace"><KEYBINDING NAME="Name"><KEYVALUE>{BIG}'
                 '</KEYVALUE></KEYBINDING></INSTANCENAME></IPARAMVALUE>'), "GetInstance"),
    (imethodcall("GetQualifier", f'<IPARAMVALUE NAME="QualifierName"><VALUE>{BIG}</VALUE>'
                 '</IPARAMVALUE>'), "GetQualifier"),
    (imethodcall("PullInstancesWithPath", '<IPARAMVALUE NAME="EnumerationContext"><VALUE>'
                 f'{BIG}</VALUE></IPARAMVALUE><IPARAMVALUE NAME="MaxObjectCount"><VALUE>1'
                 '</VALUE></IPARAMVALUE>'), "PullInstancesWithPath"),
], ids=["classname", "getclass", "param-name", "intrinsic-name", "method-name",
        "intrinsic-name-mismatch", "method-class",
        "key-value", "qualifier-name", "context"])
def test_errors_never_echo_large_content(port, body, cimmethod):
    resp = send(port, body, headers_for(cimmethod))
    check_sane(resp)
    assert resp.status in (200, 400)
    echoed = len(cimmethod) if cimmethod == MID else 0     # the response NAME echoes it
    assert len(resp.body) < 2000 + echoed, resp.body[:300]
    assert BIG[:2000] not in resp.text
    if resp.status == 200:
        _code, desc = resp.cim_error()
        assert len(desc) < 400 and MID[:100] not in desc
    assert_alive(port)


def test_invalid_enumeration_context_raw(port):
    body = imethodcall("PullInstancesWithPath", '<IPARAMVALUE NAME="EnumerationContext"><VALUE>'
                       'bogus</VALUE></IPARAMVALUE><IPARAMVALUE NAME="MaxObjectCount"><VALUE>1'
                       '</VALUE></IPARAMVALUE>')
    code, _ = cim_error_of(port, body, "PullInstancesWithPath")
    assert code == 21


def test_request_not_valid(port):
    body = ENUM_NAMES.replace("<SIMPLEREQ>", "<SIMPLEREQ><BOGUS></BOGUS>")
    resp = send(port, body, headers_for("EnumerateInstanceNames"))
    check_sane(resp)
    assert resp.status == 400 and resp.headers["CIMError"] == "request-not-valid"
    assert_alive(port)


def test_parse_error_from_pywbem_is_400(port):
    body = imethodcall("GetInstance", '<IPARAMVALUE NAME="InstanceName"><INSTANCENAME>'
                       '</INSTANCENAME></IPARAMVALUE>')
    resp = send(port, body, headers_for("GetInstance"))
    check_sane(resp)
    assert resp.status == 400 and resp.headers["CIMError"] == "request-not-valid"
    TupleParser()          # pywbem's parser is what found it; the server kept running
    assert_alive(port)


@pytest.mark.parametrize("sent, promised", [(1000, 2000), (200_000, 400_000)],
                         ids=["small", "large"])
def test_body_shorter_than_its_content_length(port, sent, promised):
    """The client stops sending (half-close) before Content-Length bytes: small bodies
    are read in one piece, large ones in chunks (never joined). Either way the server
    closes the connection (a client that cannot send the rest is gone: aiohttp answers
    nothing) or answers 400, never a 500, a traceback or a hang, and goes on serving."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers_for("EnumerateInstanceNames").items())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Length: {promised}\r\n"
                  f"{head}\r\n".encode() + b"x" * sent)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    assert status in (None, 400) and b"Traceback" not in data, data[:300]
    assert_alive(port)
