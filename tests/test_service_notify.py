"""sd_notify (Type=notify): `cim-provider serve` says READY=1 only once its listeners
accept, RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a SIGHUP, STOPPING=1 on
SIGTERM -- read from a real datagram socket given as $NOTIFY_SOCKET, as systemd does.
"""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

try:
    from tests.support.service import Service, serve_args
    from tests.support.wbem_server import free_port
except ImportError:
    from support.service import Service, serve_args  # type: ignore
    from support.wbem_server import free_port  # type: ignore

from cim_provider.server.notify import Notifier, monotonic_usec

pytestmark = pytest.mark.timeout(120)


def _accepts_now(port: int) -> bool:
    """A TCP connect that succeeds at once (a listening socket completes the handshake
    in the kernel, whether or not the server has got round to accept())."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_ready_only_once_every_listener_accepts_then_reload_and_stop(tmp_path):
    http, https = free_port(), free_port()
    svc = Service(tmp_path, serve_args(tmp_path, "--listen", f"127.0.0.1:{http}",
                                       "--https-listen", f"127.0.0.1:{https}"))
    try:
        first = svc.notify.recv()
        # At the moment READY=1 arrives, both ports accept: it was not sent early.
        accepted = _accepts_now(http), _accepts_now(https)
        assert first.get("READY") == "1", first
        assert accepted == (True, True)
        assert f"http://127.0.0.1:{http}" in first["STATUS"]
        assert f"https://127.0.0.1:{https}" in first["STATUS"]
        assert svc.notify.pending() == []             # one READY, nothing else yet

        before = monotonic_usec()
        reloading, ready = svc.reload()
        assert reloading.get("RELOADING") == "1", reloading
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time with it
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        assert ready.get("READY") == "1", ready
        assert svc.proc.poll() is None and _accepts_now(http)

        svc.signal(signal.SIGTERM)
        stopping = svc.notify.recv()
        assert stopping.get("STOPPING") == "1", stopping
        assert svc.proc.wait(15) == 0
    finally:
        svc.stop()
    assert "Traceback" not in svc.log_text()


def test_no_ready_when_a_listener_cannot_start(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    svc = Service(tmp_path, serve_args(tmp_path, "--listen", f"127.0.0.1:{port}"))
    try:
        assert svc.proc.wait(60) != 0
        assert svc.notify.pending() == []
        assert "already in use" in svc.log_text() and "Traceback" not in svc.log_text()
    finally:
        svc.stop()
        busy.close()


def test_sighup_while_starting_does_not_kill(tmp_path):
    port = free_port()
    svc = Service(tmp_path, serve_args(tmp_path, "--listen", f"127.0.0.1:{port}"))
    try:
        svc.wait_log("no authentication")    # logged before the server listens
        svc.signal(signal.SIGHUP)
        assert svc.notify.recv().get("READY") == "1"
        assert svc.proc.poll() is None
    finally:
        assert svc.stop() == 0


# --- the notifier itself ------------------------------------------------------------------

def test_notifier_abstract_socket_and_environment(monkeypatch):
    name = f"cim-provider-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())          # '@name' in $NOTIFY_SOCKET
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    n = Notifier.from_env()
    assert "NOTIFY_SOCKET" not in os.environ    # children cannot speak for us
    try:
        assert n.ready("up")
        assert sock.recv(1024) == b"READY=1\nSTATUS=up"
        assert n.stopping()
        assert sock.recv(1024).startswith(b"STOPPING=1\n")
    finally:
        n.close()
        sock.close()


def test_notifier_without_socket_is_a_no_op(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().ready()
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert not gone.ready() and not gone.ready()      # never raises
    assert sum("cannot notify" in r.message for r in caplog.records) == 1   # said once
