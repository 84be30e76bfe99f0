"""`cim-provider serve` refuses a start it cannot make good, with one clear line and
exit status 2, never a traceback: listener addresses (`--listen PORT` is every address,
ports outside 1..65535, an address in use, a name that does not resolve), TLS files
(which file, what is wrong with it), and directories it must write (`--state-dir`,
`--cache-dir` only when the compiled classes must be written).

Every test runs the installed command (`.venv/bin/cim-provider`) on 127.0.0.1 ports.
A directory that root may not write is made with the permission bits plus `setpriv`
dropping CAP_DAC_OVERRIDE for the server (root then obeys the bits like anyone).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

try:
    from tests.support import secure
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import secure  # type: ignore
    from support import wbem_server as ws  # type: ignore

pytestmark = pytest.mark.timeout(120)

NO_BUS = "unix:path=/nonexistent/cim-provider-test-bus"


def serve(tmp_path: Path, *args: str, prefix: tuple[str, ...] = (),
          timeout: float = 60) -> subprocess.CompletedProcess:
    """One `serve` that is expected to refuse to start (it exits by itself)."""
    return subprocess.run(
        [*prefix, str(ws.CIM_PROVIDER), "serve", "--libvirt-uri", "test:///default",
         "--manager-bus", NO_BUS, "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=str(ws.ROOT),
        env={k: v for k, v in os.environ.items() if k != "CIM_PROVIDER_CACHE_DIR"})


def refused(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2, `message` on stderr as the reason, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert message in proc.stderr, out
    assert "Traceback" not in out, out


class Running:
    """A `serve` that starts; stopped with SIGTERM."""

    def __init__(self, tmp_path: Path, port: int, *args: str,
                 prefix: tuple[str, ...] = ()) -> None:
        self.log = tmp_path / f"serve-{port}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [*prefix, str(ws.CIM_PROVIDER), "serve", "--libvirt-uri", "test:///default",
                 "--manager-bus", NO_BUS, "--state-dir", str(tmp_path / "state"), *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=str(ws.ROOT))
        try:
            ws.wait_accepting(port, time.monotonic() + 60, self.proc)
        except BaseException:
            self.stop()
            raise

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def without_dac_override() -> tuple[str, ...]:
    """A command prefix under which the permission bits apply to this user too."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a directory unwritable")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search")


@pytest.fixture
def busy_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


# --- listeners ----------------------------------------------------------------------------

def test_listen_values():
    import argparse

    from cim_provider.server.listen import parse_listen, show_address
    assert parse_listen("5988") == ("", 5988)                  # every address
    assert parse_listen("127.0.0.1:5988") == ("127.0.0.1", 5988)
    assert parse_listen(":5988") == ("127.0.0.1", 5988)
    assert parse_listen("[::1]:5989") == ("::1", 5989)
    assert parse_listen("host.example.test:1") == ("host.example.test", 1)
    for bad in ("0", "65536", "127.0.0.1:0", "[::1]:70000", "x", "127.0.0.1:", "[::1:5988"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listen(bad)
    assert [show_address(*a) for a in (("", 5988), ("::1", 1), ("10.0.0.1", 2))] == \
        ["*:5988", "[::1]:1", "10.0.0.1:2"]


@pytest.mark.parametrize("value", ["0", "65536", "127.0.0.1:0", "127.0.0.1:99999"])
def test_ports_outside_the_range_are_refused_at_parse_time(tmp_path, value):
    for option in ("--listen", "--https-listen"):
        proc = serve(tmp_path, option, value)
        refused(proc, f"argument {option}: port ")
        assert "outside 1..65535" in proc.stderr
        assert not (tmp_path / "state").exists()       # nothing started, nothing made


def test_port_alone_is_every_address_and_needs_the_exposure_rules(tmp_path):
    port = ws.free_port()
    proc = serve(tmp_path, "--listen", str(port))
    refused(proc, f"not starting: plain HTTP on *:{port} would send passwords and data in "
                  f"clear; use --https-listen, or --insecure-http")
    proc = serve(tmp_path, "--listen", str(port), "--insecure-http")
    refused(proc, f"not starting: *:{port} is not loopback: refusing to serve it without "
                  f"authentication (give --users or --pam-service)")
    proc = serve(tmp_path, "--https-listen", str(port))
    refused(proc, f"*:{port} is not loopback")


def test_port_alone_serves_ipv4_and_ipv6(tmp_path):
    """With authentication and --insecure-http, `--listen PORT` answers on 127.0.0.1
    and on ::1 (both 0.0.0.0 and :: are bound, as sfcbd's port does)."""
    import pywbem
    users = secure.write_users(tmp_path / "users", secure.USERS)
    port = ws.free_port()
    srv = Running(tmp_path, port, "--listen", str(port), "--insecure-http",
                  "--users", str(users))
    try:
        for host in ("127.0.0.1", "[::1]"):
            if host == "[::1]" and not socket.has_ipv6:
                continue
            conn = pywbem.WBEMConnection(f"http://{host}:{port}", ("bob", "bob-password"),
                                         default_namespace="interop", timeout=30)
            assert conn.EnumerateInstanceNames("CIM_Namespace")
        text = srv.text()
        assert f"http://0.0.0.0:{port}" in text
        if socket.has_ipv6:
            assert f"http://[::]:{port}" in text
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("option", ["--listen", "--https-listen"])
def test_address_in_use(tmp_path, busy_port, option):
    proc = serve(tmp_path, option, f"127.0.0.1:{busy_port}")
    refused(proc, f"not starting: 127.0.0.1:{busy_port} is already in use")


def test_address_in_use_among_several(tmp_path, busy_port):
    """The second of two listeners is in use: the same message, nothing left listening."""
    free = ws.free_port()
    proc = serve(tmp_path, "--listen", f"127.0.0.1:{free}", "--listen",
                 f"127.0.0.1:{busy_port}")
    refused(proc, f"not starting: 127.0.0.1:{busy_port} is already in use")
    with socket.socket() as s:
        s.bind(("127.0.0.1", free))        # free again


def test_start_server_names_the_busy_address(busy_port):
    """In-process: start_server raises a StartupError that is also the OSError."""
    import asyncio
    import errno

    from cim_provider.server.main import start_server
    from cim_provider.server.security import ListenError, StartupError

    async def attempt():
        await start_server([("127.0.0.1", busy_port)], repo=ws.test_repository(),
                           host=ws.TEST_HOST)

    with pytest.raises(ListenError) as err:
        asyncio.run(attempt())
    assert isinstance(err.value, StartupError) and isinstance(err.value, OSError)
    assert err.value.errno == errno.EADDRINUSE
    assert str(err.value) == f"127.0.0.1:{busy_port} is already in use"


def test_host_name_that_does_not_resolve(tmp_path):
    proc = serve(tmp_path, "--listen", "no-such-host.invalid:5988")
    refused(proc, "not starting: --listen no-such-host.invalid:5988: the host name "
                  "no-such-host.invalid does not resolve")
    proc = serve(tmp_path, "--https-listen", "no-such-host.invalid:5989")
    refused(proc, "--https-listen no-such-host.invalid:5989: the host name "
                  "no-such-host.invalid does not resolve")


def test_address_not_of_this_host(tmp_path):
    """192.0.2.1 (TEST-NET-1) is nobody's address: said so, exit 2."""
    proc = serve(tmp_path, "--listen", "192.0.2.1:5988", "--insecure-http",
                 "--users", str(secure.write_users(tmp_path / "users", secure.USERS)))
    refused(proc, "not starting: 192.0.2.1:5988: 192.0.2.1 is not an address of this host")


# --- TLS files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60,
                       env={**os.environ, "OPENSSL_CONF": os.devnull})

    for n in ("a", "b"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={n}", "-keyout", str(d / f"{n}.key"), "-out", str(d / f"{n}.crt"))
    run("pkey", "-in", str(d / "a.key"), "-aes256", "-passout", "pass:secret",
        "-out", str(d / "a-encrypted.key"))
    run("x509", "-in", str(d / "a.crt"), "-outform", "der", "-out", str(d / "a.der"))
    (d / "a-both.pem").write_text((d / "a.crt").read_text() + (d / "a.key").read_text())
    (d / "junk.pem").write_text("not a certificate\n")
    return d


@pytest.mark.parametrize("files,message", [
    (("missing.crt", None), "--cert {d}/missing.crt: no such file"),
    (("a.der", None), "--cert {d}/a.der is not a PEM file"),
    (("junk.pem", None), "--cert {d}/junk.pem is not a PEM file"),
    (("a.key", None), "--cert {d}/a.key holds no PEM certificate"),
    (("a.crt", None), "--cert {d}/a.crt holds a certificate but no private key: give --key"),
    (("a.crt", "b.key"), "--key {d}/b.key: the private key does not match the certificate "
                         "in --cert {d}/a.crt"),
    (("a.crt", "missing.key"), "--key {d}/missing.key: no such file"),
    (("a.crt", "a.crt"), "--key {d}/a.crt holds no PEM private key"),
    (("a.crt", "a-encrypted.key"), "--key {d}/a-encrypted.key: the private key is "
                                   "encrypted"),
    ((None, "a.key"), "--key {d}/a.key needs --cert"),
], ids=["missing", "der", "junk", "key-as-cert", "no-key", "mismatch", "missing-key",
        "cert-as-key", "encrypted", "key-alone"])
def test_tls_files_are_named_with_their_problem(tmp_path, pki, files, message):
    cert, key = files
    args = ["--https-listen", f"127.0.0.1:{ws.free_port()}"]
    if cert is not None:
        args += ["--cert", str(pki / cert)]
    if key is not None:
        args += ["--key", str(pki / key)]
    refused(serve(tmp_path, *args), message.format(d=pki))


def test_a_good_pair_in_one_file_serves(tmp_path, pki):
    port = ws.free_port()
    srv = Running(tmp_path, port, "--listen", f"127.0.0.1:{ws.free_port()}",
                  "--https-listen", f"127.0.0.1:{port}", "--cert", str(pki / "a-both.pem"))
    assert srv.stop() == 0


# --- directories --------------------------------------------------------------------------

def test_state_dir_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(serve(tmp_path, "--state-dir", str(tmp_path / "file")),
            f"not starting: --state-dir {tmp_path}/file is not a directory")
    refused(serve(tmp_path, "--state-dir", str(tmp_path / "file" / "state")),
            f"not starting: --state-dir {tmp_path}/file/state cannot be created")


def test_state_dir_must_be_writable(tmp_path):
    prefix = without_dac_override()
    state = tmp_path / "readonly-state"
    state.mkdir(mode=0o555)
    try:
        refused(serve(tmp_path, "--state-dir", str(state), prefix=prefix),
                f"not starting: --state-dir {state} is not writable (Permission denied)")
    finally:
        state.chmod(0o755)


def test_state_dir_is_created(tmp_path):
    port = ws.free_port()
    srv = Running(tmp_path, port, "--listen", f"127.0.0.1:{port}",
                  "--state-dir", str(tmp_path / "new" / "state"))
    assert srv.stop() == 0
    assert (tmp_path / "new" / "state").is_dir()


def _cache_dir(tmp_path: Path, with_classes: bool) -> Path:
    """A cache directory with the checkout's schema zip, and its class cache or not."""
    from cim_provider.wbem.repository import class_cache_in, resolve_cache_dir, schema_zip_in
    checkout = resolve_cache_dir(None)
    if not schema_zip_in(checkout).is_file():
        pytest.skip("no DMTF schema in the checkout's cache (make setup)")
    cache = tmp_path / "cache"
    schema_zip_in(cache).parent.mkdir(parents=True)
    shutil.copy(schema_zip_in(checkout), schema_zip_in(cache))
    if with_classes:
        # the current class cache, made by a load with this cache directory
        from cim_provider.wbem.repository import Repository
        Repository.load(cache)
        assert any(class_cache_in(cache).glob("classes-*.pickle"))
    return cache


def test_cache_dir_must_be_writable_when_classes_are_compiled(tmp_path):
    cache = _cache_dir(tmp_path, with_classes=False)
    (cache / "classes").write_text("in the way")             # even root cannot write there
    refused(serve(tmp_path, "--cache-dir", str(cache)),
            f"--cache-dir {cache}: the compiled classes must be written to {cache}/classes, "
            f"which is not writable")
    prefix = without_dac_override()
    (cache / "classes").unlink()
    cache.chmod(0o555)
    try:
        refused(serve(tmp_path, "--cache-dir", str(cache), prefix=prefix),
                f"--cache-dir {cache}: the compiled classes must be written to "
                f"{cache}/classes, which is not writable (Permission denied)")
    finally:
        cache.chmod(0o755)


def test_read_only_cache_dir_with_its_classes_is_fine(tmp_path):
    prefix = without_dac_override()
    cache = _cache_dir(tmp_path, with_classes=True)
    for d in (cache / "classes", cache / "schema", cache):
        d.chmod(0o555)
    try:
        port = ws.free_port()
        srv = Running(tmp_path, port, "--listen", f"127.0.0.1:{port}",
                      "--cache-dir", str(cache), prefix=prefix)
        assert srv.stop() == 0
    finally:
        for d in (cache, cache / "classes", cache / "schema"):
            d.chmod(0o755)
