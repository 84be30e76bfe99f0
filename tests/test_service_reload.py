"""SIGHUP (`systemctl reload`): `serve` reads its configuration file, users file and TLS
pair again and applies the log level, without dropping a connection; a reload that
fails keeps everything as it was and says why. The Manager re-reads its log level and
never dies of a reload. Real subprocesses on 127.0.0.1.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import time

import pytest

try:
    from tests.support import secure as sec
    from tests.support.service import Service, make_cert, serve_args
    from tests.support.wbem_server import free_port
except ImportError:
    from support import secure as sec  # type: ignore
    from support.service import Service, make_cert, serve_args  # type: ignore
    from support.wbem_server import free_port  # type: ignore

pytestmark = pytest.mark.timeout(180)

ENUM_OM = sec.imethodcall("EnumerateInstanceNames", '<IPARAMVALUE NAME="ClassName">'
                          '<CLASSNAME NAME="CIM_ObjectManager"/></IPARAMVALUE>', ns="interop")
ALICE = ("alice", "alice-password", "operator")
BOB = ("bob", "bob-password", "reader")


def _headers(user: tuple[str, str, str]) -> dict[str, str]:
    return {**sec.cim_headers("EnumerateInstanceNames", obj="interop"),
            "Authorization": sec.basic(user[0], user[1])}


def _status(port: int, user: tuple[str, str, str], tls: bool = False) -> int:
    return sec.post(port, ENUM_OM, _headers(user), tls=tls)[0]


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _served_cert(port: int) -> bytes:
    """The certificate (DER) a new TLS client is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with _unverified().wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def _der(cert_path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


def _install(src, dst) -> None:
    """Replace `dst` by a copy of `src` in one step (as a certificate renewal does)."""
    tmp = dst.with_name(dst.name + ".new")
    tmp.write_bytes(src.read_bytes())
    os.chmod(tmp, 0o600)
    os.replace(tmp, dst)


def _toml(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)           # strings, numbers


def _write_config(path, **serve) -> None:
    path.write_text("[serve]\n" + "".join(f"{key.replace('_', '-')} = {_toml(value)}\n"
                                          for key, value in serve.items()))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return {"old": make_cert(d, "old", 1001), "new": make_cert(d, "new", 1002),
            "other": make_cert(d, "other", 1003)}


@pytest.fixture
def server(tmp_path, pairs):
    """`serve` with a configuration file naming a users file (alice only) and a TLS pair
    (serial 1001), plain HTTP and HTTPS on loopback."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    _install(pairs["old"][0], cert)
    _install(pairs["old"][1], key)
    users = sec.write_users(tmp_path / "users", {ALICE[0]: ALICE[1:]})
    conf = tmp_path / "cim-provider.toml"
    http_port, tls_port = free_port(), free_port()
    settings = dict(listen=[f"127.0.0.1:{http_port}"], https_listen=[f"127.0.0.1:{tls_port}"],
                    users=str(users), cert=str(cert), key=str(key), log_level="info")
    _write_config(conf, **settings)
    svc = Service(tmp_path, serve_args(tmp_path, "--config", str(conf)))
    svc.http_port, svc.tls_port = http_port, tls_port
    svc.conf, svc.settings, svc.cert, svc.key, svc.users = conf, settings, cert, key, users
    try:
        assert svc.notify.recv().get("READY") == "1", svc.log_text()
        yield svc
    finally:
        assert svc.stop() == 0, svc.log_text()
        assert "Traceback" not in svc.log_text(), svc.log_text()


def test_new_user_logs_in_after_reload(server):
    assert _status(server.http_port, ALICE) == 200
    assert _status(server.http_port, BOB) == 401
    sec.write_users(server.users, {ALICE[0]: ALICE[1:], BOB[0]: BOB[1:]})
    start = len(server.log_text())
    server.reload()
    assert _status(server.http_port, BOB) == 200
    assert _status(server.http_port, ALICE) == 200
    log = server.wait_log("reloaded", start=start)[start:]
    assert f"users file {server.users} (2 users)" in log
    # and a user taken out is out at once
    sec.write_users(server.users, {BOB[0]: BOB[1:]})
    server.reload()
    assert _status(server.http_port, ALICE) == 401


def test_rotated_certificate_for_new_clients_old_connection_kept(server, pairs):
    old_der, new_der = _der(pairs["old"][0]), _der(pairs["new"][0])
    assert _served_cert(server.tls_port) == old_der
    # a keep-alive connection made with the old certificate
    conn = http.client.HTTPSConnection("127.0.0.1", server.tls_port, timeout=30,
                                       context=_unverified())
    try:
        conn.request("POST", "/cimom", ENUM_OM, _headers(ALICE))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        sock = conn.sock
        assert sock.getpeercert(binary_form=True) == old_der

        _install(pairs["new"][0], server.cert)          # renewal: same paths, new serial
        _install(pairs["new"][1], server.key)
        start = len(server.log_text())
        server.reload()
        assert _served_cert(server.tls_port) == new_der   # a new handshake: the new one
        assert _status(server.tls_port, ALICE, tls=True) == 200
        assert f"TLS certificate {server.cert} (new)" in server.log_text()[start:]

        # the old connection was not dropped: the same socket answers again
        conn.request("POST", "/cimom", ENUM_OM, _headers(ALICE))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        assert conn.sock is sock and sock.getpeercert(binary_form=True) == old_der
    finally:
        conn.close()


def test_broken_config_keeps_the_old_settings(server, pairs):
    old_der = _der(pairs["old"][0])
    # a renewed pair and a broken file at once: nothing at all is applied
    _install(pairs["new"][0], server.cert)
    _install(pairs["new"][1], server.key)
    server.conf.write_text("[serve]\nlog-level = \"debug\"\nmax-connections = \"many\"\n")
    start = len(server.log_text())
    reloading, ready = server.reload()
    assert reloading.get("RELOADING") == "1" and ready.get("READY") == "1"
    assert "last reload failed" in ready["STATUS"] and "max-connections" in ready["STATUS"]
    log = server.wait_log("reload failed", start=start)[start:]
    assert re.search(rf"ERROR cim_provider\.server\.reload: reload failed, keeping the current "
                     rf"settings: {re.escape(str(server.conf))}: \[serve\] max-connections", log), log
    assert server.proc.poll() is None
    assert _served_cert(server.tls_port) == old_der
    assert _status(server.http_port, ALICE) == 200
    assert " DEBUG " not in server.log_text()[start:]           # the level stayed INFO

    # fixed: the next reload applies it all, and says what needs a restart
    settings = dict(server.settings, log_level="debug", max_connections=9)
    _write_config(server.conf, **settings)
    start = len(server.log_text())
    server.reload()
    log = server.log_text()[start:]
    assert _served_cert(server.tls_port) == _der(pairs["new"][0])
    assert "log level DEBUG (was INFO)" in log
    assert "DEBUG cim_provider.server.reload: reload done" in log
    assert re.search(r"WARNING .*changed but applied only on restart: --max-connections$",
                     log, re.M), log


def test_bad_certificate_keeps_the_old_one(server, pairs):
    old_der = _der(pairs["old"][0])
    _install(pairs["new"][0], server.cert)
    _install(pairs["other"][1], server.key)          # a key that does not match
    start = len(server.log_text())
    server.reload()
    log = server.wait_log("reload failed", start=start)[start:]
    assert f"TLS certificate {server.cert}" in log and "ERROR" in log
    assert _served_cert(server.tls_port) == old_der
    assert _status(server.tls_port, ALICE, tls=True) == 200


def test_unreadable_users_file_keeps_the_old_users(server):
    os.chmod(server.users, 0o644)                    # the server refuses a public file
    start = len(server.log_text())
    server.reload()
    log = server.wait_log("reload failed", start=start)[start:]
    assert "users file" in log and "chmod 600" in log
    os.chmod(server.users, 0o600)
    assert _status(server.http_port, ALICE) == 200


def test_listen_change_needs_a_restart(server):
    moved = free_port()
    _write_config(server.conf, **dict(server.settings, listen=[f"127.0.0.1:{moved}"]))
    start = len(server.log_text())
    server.reload()
    log = server.log_text()[start:]
    assert "applied only on restart: --listen" in log
    assert _status(server.http_port, ALICE) == 200     # still where it was


def test_reload_hooks_run(tmp_path):
    """ServerHandle.on_reload: what other parts register (the audit log reopens)."""
    import argparse

    from cim_provider.server.reload import Reloader
    calls = []

    def boom() -> None:
        raise RuntimeError("hook failure")

    hooks: list = []
    r = Reloader(argparse.Namespace(), ssl_context=None, authenticate=None, state_dir=None,
                 hooks=hooks)
    hooks += [boom, lambda: calls.append(1)]        # registered later: still run
    assert r.reload() is True and calls == [1]      # a failing hook stops no other


# --- the Manager ----------------------------------------------------------------------

def test_manager_sighup_rereads_the_log_level_and_survives_a_broken_file(tmp_path):
    from cim_provider.busdaemon import PrivateBus
    conf = tmp_path / "cim-provider.toml"
    conf.write_text("[manager]\nlog-level = \"info\"\n")
    bus = PrivateBus()
    svc = Service(tmp_path, ["manager", "--config", str(conf), "--bus", bus.address,
                             "--store", f"sqlite:{tmp_path}/m.db",
                             "--libvirt-uri", f"qemu+unix:///system?socket={tmp_path}/nolibvirt",
                             "--poll-interval", "0.1"], notify=False)
    try:
        svc.wait_log("serving org.example.virt")
        assert " DEBUG " not in svc.log_text()
        # (poll-interval is on the command line, which wins: not a change)
        conf.write_text("[manager]\nlog-level = \"DEBUG\"\npoll-interval = 5.0\n"
                        "log-target = \"stderr\"\n")
        svc.signal(signal.SIGHUP)
        svc.wait_log("log level DEBUG (was INFO)")
        svc.wait_log("applied only on restart: --log-target\n")
        # libvirt's errors (the unreachable URI, polled) now show, at DEBUG
        svc.wait_log("DEBUG cim_provider.manager.store: libvirt: ")
        conf.write_text("[manager\n")
        svc.signal(signal.SIGHUP)
        svc.wait_log("reload failed, keeping the current settings")
        for _ in range(3):
            svc.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert svc.proc.poll() is None
        svc.signal(signal.SIGTERM)
        assert svc.proc.wait(15) == 0
    finally:
        svc.stop()
        bus.stop()
    assert "Traceback" not in svc.log_text()
