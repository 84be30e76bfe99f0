"""Transport and authentication (issue 5): HTTPS with TLS 1.2+, self-signed pair on first
use, HTTP Basic against a users file, roles, failed-login brake, `cim-provider passwd`,
and the start-up refusals (plain HTTP or no authentication beyond loopback, public
users file, PAM without a binding).
"""
from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, CIMProperty

try:
    from tests.support import secure as sec
    from tests.support import wbem_server as ws
except ImportError:
    from support import secure as sec  # type: ignore
    from support import wbem_server as ws  # type: ignore

from cim_provider.server import auth

pytestmark = pytest.mark.timeout(120)
ALICE, BOB = sec.USERS["alice"][0], sec.USERS["bob"][0]


@pytest.fixture(autouse=True)
def _no_ca_bundle_override(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override pywbem's
    no_verification; these tests trust the server's self-signed pair explicitly."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = sec.SecureServer(tmp_path_factory.mktemp("auth"), users=sec.USERS, https=True,
                           burst=3, refill=3600.0)
    yield srv
    srv.stop()


# --- HTTPS --------------------------------------------------------------------------

def test_pywbem_over_https_with_credentials(server):
    conn = server.conn("alice", https=True)
    names = conn.EnumerateInstanceNames("VIRT_ComputerSystem")
    assert {p.keybindings["Name"] for p in names} == set(ws.GUEST_UUIDS)


def test_self_signed_pair_created_private_and_reused(server, tmp_path):
    cert = server.workdir / "state" / "tls" / "server.crt"
    key = cert.with_name("server.key")
    assert cert.exists() and key.exists()
    assert key.stat().st_mode & 0o077 == 0
    pem = ssl.get_server_certificate(("127.0.0.1", server.tls_port))
    assert pem.strip() == cert.read_text().strip()
    # a second start with the same state directory keeps the pair
    before = cert.read_bytes()
    from cim_provider.server.tls import ensure_self_signed
    assert ensure_self_signed(cert.parent, "other") == (cert, key)
    assert cert.read_bytes() == before


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_refused(server, version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx.minimum_version = version
            ctx.maximum_version = version
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")   # so the client really offers it
        except (ValueError, ssl.SSLError):
            pytest.fail(f"this OpenSSL cannot offer {version.name}: the refusal cannot be shown")
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as exc:
            with ctx.wrap_socket(raw) as tls:
                tls.do_handshake()
    # the server's refusal (an alert or a hang-up), not the client failing to offer it
    assert isinstance(exc.value, ssl.SSLEOFError) or \
        "PROTOCOL_VERSION" in str(exc.value).upper(), exc.value
    sec.assert_alive(server.tls_port, {"Authorization": sec.basic("alice", ALICE)}, tls=True)


def test_tls12_and_13_accepted(server):
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                assert tls.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]


def test_wbemcli_over_https(server):
    url = f"https://alice:{ALICE}@127.0.0.1:{server.tls_port}/root/virt:VIRT_ComputerSystem"
    proc = subprocess.run(["/usr/bin/wbemcli", "-noverify", "ein", url], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(re.findall(r',Name="([0-9a-f-]{36})"', proc.stdout)) == sorted(ws.GUEST_UUIDS)
    bad = url.replace(ALICE, "nope")
    proc = subprocess.run(["/usr/bin/wbemcli", "-noverify", "ein", bad], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "username/password" in proc.stderr


# --- Basic authentication -----------------------------------------------------------------

def _status(server, authz: str | None, tls: bool = False):
    h = sec.cim_headers("EnumerateInstanceNames")
    if authz is not None:
        h["Authorization"] = authz
    return sec.post(server.tls_port if tls else server.port, sec.ENUM_NAMES, h, tls=tls)


@pytest.mark.parametrize("authz", [None, "", "Basic", "Basic !!!notbase64", "Bearer abc",
                                   "Basic " + "QQ==" * 2000, "Basic Ym9i"])   # "bob", no ':'
def test_missing_or_malformed_credentials_challenged(server, authz):
    status, headers, body = _status(server, authz)
    assert status == 401, body
    assert headers["WWW-Authenticate"] == 'Basic realm="cimom"'
    assert b"<CIM" not in body


def test_correct_credentials_both_transports(server):
    for tls in (False, True):
        status, _h, body = _status(server, sec.basic("bob", BOB), tls)
        assert status == 200 and body.count(b"<INSTANCENAME ") == 3


def test_pywbem_wrong_password_is_auth_error(tmp_path):
    srv = sec.SecureServer(tmp_path, users=sec.USERS)
    try:
        with pytest.raises(pywbem.AuthError):
            srv.conn("alice", "wrong").EnumerateInstanceNames("VIRT_ComputerSystem")
        with pytest.raises(pywbem.AuthError):
            srv.conn("mallory", "whatever").EnumerateInstanceNames("VIRT_ComputerSystem")
        with pytest.raises(pywbem.AuthError):
            srv.conn().EnumerateInstanceNames("VIRT_ComputerSystem")
        assert srv.stats()["failed_logins"] == 2
    finally:
        srv.stop()


def test_failed_logins_braked_per_address_and_logged(tmp_path, caplog):
    srv = sec.SecureServer(tmp_path, users=sec.USERS, burst=3, refill=3600.0)
    try:
        caplog.set_level("WARNING", logger="cim_provider.server.auth")
        for _ in range(3):
            assert _status(srv, sec.basic("alice", "guess"))[0] == 401
        # the bucket is empty: even the right password is not checked any more
        status, headers, _ = _status(srv, sec.basic("alice", ALICE))
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert _status(srv, sec.basic("alice", "guess"))[0] == 429
        assert srv.stats()["failed_logins"] == 3      # no scrypt work while braked
        assert sum("failed login for 'alice' from 127.0.0.1" in r.getMessage()
                   for r in caplog.records) == 3
        # another address is not affected (the brake is per address)
        assert srv.handle.authenticate.brake.retry_after("127.0.0.2") == 0
    finally:
        srv.stop()


def test_concurrent_wrong_logins_braked_before_the_password_check(tmp_path):
    """The token is taken before the (slow, threaded) password check: 40 wrong logins
    sent at once from one address -> at most `burst` reach the check (401), the rest 429."""
    import threading
    burst, n = 3, 40
    srv = sec.SecureServer(tmp_path, users=sec.USERS, burst=burst, refill=3600.0)
    try:
        barrier = threading.Barrier(n)
        results: list[tuple[int, object]] = []
        lock = threading.Lock()

        def attempt(i):
            user = "alice" if i % 2 else "mallory"     # known and unknown user alike
            h = sec.cim_headers("EnumerateInstanceNames")
            h["Authorization"] = sec.basic(user, f"guess-{i}")
            barrier.wait()
            status, headers, _ = sec.post(srv.port, sec.ENUM_NAMES, h)
            with lock:
                results.append((status, headers.get("Retry-After")))

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == n
        statuses = [s for s, _ in results]
        assert set(statuses) <= {401, 429}, statuses
        assert statuses.count(401) <= burst and statuses.count(429) >= n - burst, statuses
        assert all(int(ra) >= 1 for s, ra in results if s == 429)
        assert srv.stats()["failed_logins"] == statuses.count(401)
        # braked: even the right password is refused without a check
        status, _h, _b = _status(srv, sec.basic("alice", ALICE))
        assert status == 429
        # after the refill (the brake's clock moved on an hour per token) it works again
        brake = srv.handle.authenticate.brake
        brake.clock = lambda: time.monotonic() + 3600.0 * (burst + 1)
        assert brake.retry_after("127.0.0.1") == 0
        status, _h, body = _status(srv, sec.basic("alice", ALICE))
        assert status == 200 and body.count(b"<INSTANCENAME ") == 3
        # a successful login gives its token back
        assert brake.retry_after("127.0.0.1") == 0
        assert srv.stats()["failed_logins"] == statuses.count(401)
    finally:
        srv.stop()


def test_brake_take_and_refund():
    now = [0.0]
    brake = auth.FailureBrake(burst=2, refill=10.0, clock=lambda: now[0])
    assert brake.take("a") and brake.take("a")
    assert not brake.take("a") and brake.retry_after("a") == 10
    assert brake.take("b")                       # per address
    brake.refund("a")
    assert brake.retry_after("a") == 0 and brake.take("a") and not brake.take("a")
    now[0] += 10.0                               # one token back
    assert brake.take("a") and not brake.take("a")
    for _ in range(5):
        brake.refund("b")                        # never above the burst
    assert brake.take("b") and brake.take("b") and not brake.take("b")


def test_brake_refills():
    brake = auth.FailureBrake(burst=2, refill=0.05)
    assert brake.take("a") and brake.take("a")   # two attempts, neither refunded
    assert brake.retry_after("a") >= 1 and brake.retry_after("b") == 0
    deadline = time.monotonic() + 10
    while brake.retry_after("a"):
        assert time.monotonic() < deadline, "the bucket never refilled"
        time.sleep(0.02)


def test_brake_memory_bounded():
    brake = auth.FailureBrake(burst=1, refill=3600, max_addresses=100)
    for i in range(1000):
        assert brake.take(f"10.0.{i // 256}.{i % 256}")
    assert len(brake._buckets) == 100


# --- roles ------------------------------------------------------------------------------

def test_reader_reads_everything(server):
    conn = server.conn("bob")
    assert len(conn.EnumerateInstances("VIRT_ComputerSystem")) == 3
    assert conn.GetInstance(ws.guest_path(ws.GUEST_UUIDS[0]))["ElementName"] == "guest-0"
    assert len(conn.AssociatorNames(ws.host_path())) == 3
    res = conn.OpenEnumerateInstances("VIRT_ComputerSystem", MaxObjectCount=1)
    conn.CloseEnumeration(res.context)
    assert conn.EnumerateClassNames(DeepInheritance=True)
    assert list(conn.ExecQuery("WQL", "SELECT * FROM VIRT_ComputerSystem WHERE EnabledState = 2"))


def test_reader_may_not_invoke_methods(server):
    calls = len(server.providers["guests"].calls)
    with pytest.raises(pywbem.CIMError) as exc:
        server.conn("bob").InvokeMethod("RequestStateChange", ws.guest_path(ws.GUEST_UUIDS[0]),
                                        RequestedState=pywbem.Uint16(3))
    assert exc.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED
    with pytest.raises(pywbem.CIMError) as exc:
        server.conn("bob").InvokeMethod("Echo", pywbem.CIMClassName(ws.ALLTYPES_CLASS,
                                                                    namespace=ws.VIRT))
    assert exc.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED
    assert len(server.providers["guests"].calls) == calls      # never reached the provider
    rv, _out = server.conn("alice").InvokeMethod(
        "RequestStateChange", ws.guest_path(ws.GUEST_UUIDS[0]), RequestedState=pywbem.Uint16(3))
    assert rv == 0 and len(server.providers["guests"].calls) == calls + 1


def test_reader_may_not_manage_subscriptions(server):
    reader, operator = server.conn("bob", namespace="interop"), server.conn("alice", namespace="interop")
    flt = CIMInstance("CIM_IndicationFilter", properties={
        "Name": CIMProperty("Name", "reader-filter"),
        "Query": CIMProperty("Query", "SELECT * FROM CIM_InstModification"),
        "QueryLanguage": CIMProperty("QueryLanguage", "WQL")})
    for call in (lambda: reader.CreateInstance(flt),
                 lambda: reader.ModifyInstance(CIMInstance(
                     "CIM_IndicationFilter", properties={"Name": "x"},
                     path=CIMInstanceName("CIM_IndicationFilter", {"Name": "x"}))),
                 lambda: reader.DeleteInstance(CIMInstanceName(
                     "CIM_IndicationFilter", {"Name": "x"}, namespace="interop"))):
        with pytest.raises(pywbem.CIMError) as exc:
            call()
        assert exc.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED
    # an operator gets past the role check (the outcome is the subscription code's business)
    try:
        path = operator.CreateInstance(flt)
    except pywbem.CIMError as exc:
        assert exc.status_code != pywbem.CIM_ERR_ACCESS_DENIED
    else:
        operator.DeleteInstance(path)


def test_pull_context_belongs_to_its_user(server):
    res = server.conn("alice").OpenEnumerateInstancePaths("VIRT_ComputerSystem", MaxObjectCount=1)
    assert not res.eos
    with pytest.raises(pywbem.CIMError) as exc:
        server.conn("bob").PullInstancePaths(res.context, MaxObjectCount=5)
    assert exc.value.status_code == pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT
    server.conn("alice").CloseEnumeration(res.context)


def test_no_auth_on_loopback_is_operator(tmp_path):
    srv = sec.SecureServer(tmp_path)
    try:
        rv, _ = srv.conn().InvokeMethod("RequestStateChange", ws.guest_path(ws.GUEST_UUIDS[0]),
                                        RequestedState=pywbem.Uint16(3))
        assert rv == 0
    finally:
        srv.stop()


# --- the users file and `cim-provider passwd` -----------------------------------------------

def passwd(users, *args, stdin="pass-word-1\npass-word-1\n"):
    return subprocess.run([str(ws.CIM_PROVIDER), "passwd", "--users", str(users), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_passwd_creates_private_hashed_file(tmp_path):
    users = tmp_path / "users"
    p = passwd(users, "carol", "--role", "operator")
    assert p.returncode == 0, p.stderr
    assert users.stat().st_mode & 0o777 == 0o600
    text = users.read_text()
    assert "pass-word-1" not in text
    line = text.strip()
    assert line.startswith("carol:operator:scrypt$16384$8$1$")
    assert auth.verify_password("pass-word-1", line.split(":", 2)[2])
    assert not auth.verify_password("pass-word-2", line.split(":", 2)[2])
    # the same password again gets a different salt
    assert passwd(users, "carol").returncode == 0
    line2 = users.read_text().strip()
    assert line2 != line and line2.startswith("carol:operator:")    # role kept
    assert passwd(users, "dave").returncode == 0
    assert [row.split(":")[:2] for row in users.read_text().splitlines()] == \
        [["carol", "operator"], ["dave", "reader"]]
    assert sorted(os.listdir(tmp_path)) == ["users"]     # no temporary files left


@pytest.mark.parametrize("stdin,args,message", [
    ("pass-word-1\npass-word-2\n", ["erin"], "differ"),
    ("short\nshort\n", ["erin"], "at least"),
    ("pass-word-1\npass-word-1\n", ["bad:name"], "invalid user name"),
    ("pass-word-1\npass-word-1\n", ["erin", "--role", "admin"], "invalid choice"),
])
def test_passwd_refusals(tmp_path, stdin, args, message):
    p = passwd(tmp_path / "users", *args, stdin=stdin)
    assert p.returncode != 0 and message in p.stderr
    assert not (tmp_path / "users").exists()


def test_passwd_refuses_public_file(tmp_path):
    users = tmp_path / "users"
    assert passwd(users, "carol").returncode == 0
    before = users.read_text()
    users.chmod(0o644)
    p = passwd(users, "dave")
    assert p.returncode == 1 and "group or others" in p.stderr
    assert users.read_text() == before


def test_passwd_delete(tmp_path):
    users = tmp_path / "users"
    passwd(users, "carol")
    passwd(users, "dave")
    assert passwd(users, "carol", "--delete", stdin="").returncode == 0
    assert [row.split(":")[0] for row in users.read_text().splitlines()] == ["dave"]


def test_users_file_reread_when_changed(tmp_path):
    srv = sec.SecureServer(tmp_path, users=sec.USERS)
    try:
        assert passwd(srv.workdir / "users", "frank", "--role", "operator").returncode == 0
        deadline = time.monotonic() + 15
        while True:
            status = _status(srv, sec.basic("frank", "pass-word-1"))[0]
            if status == 200:
                break
            assert status == 401 and time.monotonic() < deadline, "new user never accepted"
            time.sleep(0.3)
        # and a changed password replaces the old one (no stale cached login)
        assert passwd(srv.workdir / "users", "frank",
                      stdin="pass-word-9\npass-word-9\n").returncode == 0
        deadline = time.monotonic() + 15
        while _status(srv, sec.basic("frank", "pass-word-1"))[0] != 401:
            assert time.monotonic() < deadline, "old password still accepted"
            time.sleep(0.3)
        assert _status(srv, sec.basic("frank", "pass-word-9"))[0] == 200
    finally:
        srv.stop()


def test_users_file_syntax_errors():
    with pytest.raises(auth.UsersFileError):
        auth.parse_users("alice:root:scrypt$1$1$1$a$b\n")
    with pytest.raises(auth.UsersFileError):
        auth.parse_users("alice:reader:plaintext\n")
    assert auth.parse_users("# comment\n\nalice:reader:scrypt$x\n")["alice"].role == "reader"
    assert not auth.verify_password("x", "scrypt$1048577$8$1$AAAA$AAAA")   # hostile cost
    assert not auth.verify_password("x", "md5$abc")


# --- start-up refusals (the real command line) -----------------------------------------------

def serve(tmp_path, *args, timeout=60):
    return subprocess.run([str(ws.CIM_PROVIDER), "serve", "--state-dir", str(tmp_path / "state"),
                           "--manager-bus", "unix:path=/nonexistent", "--libvirt-uri",
                           "test:///default", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--listen", "0.0.0.0:{port}"], "in clear"),
    (["--listen", "0.0.0.0:{port}", "--insecure-http"], "without authentication"),
    (["--https-listen", "0.0.0.0:{port}"], "without authentication"),
    (["--listen", "127.0.0.1:{port}", "--users", "{public}"], "group or others"),
    (["--https-listen", "127.0.0.1:{port}", "--cert", "/nonexistent.pem"], "TLS"),
])
def test_serve_refuses_unsafe_setups(tmp_path, args, message):
    public = sec.write_users(tmp_path / "public-users", {"a": ("pass-word-1", "reader")})
    public.chmod(0o640)
    port = ws.free_port()
    p = serve(tmp_path, *[a.format(port=port, public=public) for a in args])
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "not starting" in p.stderr


def test_serve_https_with_users_on_any_address(tmp_path):
    """Authentication plus HTTPS may listen beyond loopback (bound to 0.0.0.0 here, used
    through 127.0.0.1); plain HTTP stays on loopback."""
    users = sec.write_users(tmp_path / "users", sec.USERS)
    port, tls_port = ws.free_port(), ws.free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(ws.CIM_PROVIDER), "serve", "--state-dir", str(tmp_path / "state"),
                             "--manager-bus", "unix:path=/nonexistent",
                             "--libvirt-uri", "test:///default", "--users", str(users),
                             "--listen", f"127.0.0.1:{port}",
                             "--https-listen", f"0.0.0.0:{tls_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ws.wait_accepting(tls_port, time.monotonic() + 30, proc)
        conn = pywbem.WBEMConnection(f"https://127.0.0.1:{tls_port}", ("bob", BOB),
                                     default_namespace="interop", no_verification=True,
                                     timeout=30)
        assert len(conn.EnumerateInstanceNames("CIM_Namespace")) == 2
        text = (tmp_path / "serve.log").read_text()
        assert f"self-signed certificate {tmp_path / 'state' / 'tls' / 'server.crt'}" in text
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


# --- PAM (a real PAM stack: services made of pam_permit / pam_deny) ------------------------

PAM_SERVICES = {"cim-provider-test-permit": "pam_permit.so", "cim-provider-test-deny": "pam_deny.so"}


@pytest.fixture(scope="module")
def pam_services():
    """Two throw-away PAM services in /etc/pam.d (the only place PAM reads; the tests
    run as root, as `make test` does), removed afterwards."""
    assert os.geteuid() == 0, "the PAM tests write /etc/pam.d and need root"
    written = []
    for name, module in PAM_SERVICES.items():
        path = Path("/etc/pam.d") / name
        path.write_text(f"auth required {module}\naccount required {module}\n")
        written.append(path)
    yield list(PAM_SERVICES)
    for path in written:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("service,role,status,method_ok", [
    ("cim-provider-test-permit", "reader", 200, False),
    ("cim-provider-test-permit", "operator", 200, True),
    ("cim-provider-test-deny", "reader", 401, False),
])
def test_pam_service(tmp_path, pam_services, service, role, status, method_ok):
    """--pam-service checks every login through that PAM service; --pam-role is what
    its users may do."""
    port = ws.free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(ws.CIM_PROVIDER), "serve", "--state-dir", str(tmp_path / "state"),
                             "--manager-bus", "unix:path=/nonexistent",
                             "--libvirt-uri", "test:///default", "--pam-service", service,
                             "--pam-role", role, "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ws.wait_accepting(port, time.monotonic() + 30, proc)
        conn = pywbem.WBEMConnection(f"http://127.0.0.1:{port}", ("anyone", "any-password"),
                                     default_namespace="root/virt", timeout=30)
        if status == 401:
            with pytest.raises(pywbem.AuthError, match="401"):   # pywbem's name for a 401
                conn.EnumerateInstanceNames("VIRT_HostSystem")
            return
        host = conn.EnumerateInstanceNames("VIRT_HostSystem")[0]
        # The host implements no RequestStateChange: an operator reaches the method
        # (CIM_ERR_NOT_SUPPORTED), a reader is stopped before it.
        with pytest.raises(pywbem.CIMError) as exc:
            conn.InvokeMethod("RequestStateChange", host, RequestedState=pywbem.Uint16(2))
        expected = pywbem.CIM_ERR_NOT_SUPPORTED if method_ok else pywbem.CIM_ERR_ACCESS_DENIED
        assert exc.value.status_code == expected
    finally:
        proc.terminate()
        proc.wait(10)
