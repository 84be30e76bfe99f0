"""Log targets (logsetup.py): stderr in our format, journald's native protocol, syslog;
and libvirt's own error printing routed through logging, in the Manager too.

The journal and syslog sockets are datagram sockets of the test, named through
$CIM_PROVIDER_JOURNAL_SOCKET / $CIM_PROVIDER_SYSLOG_SOCKET.
"""
from __future__ import annotations

import array
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

try:
    from tests.support.service import LOG_LINE, Service
    from tests.support.wbem_server import CIM_PROVIDER, ROOT
except ImportError:
    from support.service import LOG_LINE, Service  # type: ignore
    from support.wbem_server import CIM_PROVIDER, ROOT  # type: ignore

from cim_provider import logsetup

pytestmark = pytest.mark.timeout(120)


def parse_journal(data: bytes) -> dict[str, str]:
    """journald's native protocol, both field forms."""
    fields = {}
    while data:
        nl = data.index(b"\n")
        line = data[:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = data[nl + 1:]
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            data = data[nl + 10 + size:]
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def dgram(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "log.sock"
    sock.bind(str(path))
    sock.settimeout(30)
    yield sock, path
    sock.close()


def _failing_manager(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`cim-provider ... manager` on a bus that is not there: one ERROR record, exit 1."""
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([str(CIM_PROVIDER), *args, "manager", "--bus",
                               "unix:path=/nonexistent/bus", "--store", f"sqlite:{tmp}/m.db"],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                              env={**os.environ, "CIM_PROVIDER_CONFIG": "", **env_extra})


# --- journal ------------------------------------------------------------------------

def test_journal_target_sends_native_fields(dgram):
    sock, path = dgram
    proc = _failing_manager({logsetup.JOURNAL_SOCKET_ENV: str(path)}, "--log-target", "journal")
    assert proc.returncode == 1
    assert proc.stderr == ""                    # everything went to the journal
    records = []
    sock.settimeout(2)
    try:
        while True:
            records.append(parse_journal(sock.recv(65536)))
    except socket.timeout:
        pass
    errors = [r for r in records if r["PRIORITY"] == "3"]
    assert errors, records
    rec = errors[0]
    assert "cannot serve the Manager" in rec["MESSAGE"]
    assert rec["MESSAGE"].startswith("cim_provider.manager.cli: ")
    assert rec["SYSLOG_IDENTIFIER"] == "cim-provider"
    assert rec["LOGGER"] == "cim_provider.manager.cli"
    assert rec["CODE_FILE"].endswith("cim_provider/manager/cli.py")
    assert int(rec["CODE_LINE"]) > 0 and rec["CODE_FUNC"] == "_serve"


def test_journal_handler_multiline_and_large_records(dgram):
    sock, path = dgram
    handler = logsetup.JournalHandler(str(path))
    logger = logging.getLogger("cim_provider.test_journal")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("two\nlines")
        rec = parse_journal(sock.recv(65536))
        assert rec["MESSAGE"] == "cim_provider.test_journal: two\nlines"
        assert rec["PRIORITY"] == "4"
        # Larger than a datagram may be: sent in a sealed memfd, as libsystemd does.
        big = "x" * (1 << 20)
        logger.debug(big)
        msg, anc, _flags, _addr = sock.recvmsg(16, socket.CMSG_SPACE(4))
        assert msg == b"" and anc, "expected a file descriptor, not a datagram"
        level, kind, data = anc[0]
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fd = array.array("i", data[:4])[0]
        try:
            rec = parse_journal(os.pread(fd, os.fstat(fd).st_size, 0))
        finally:
            os.close(fd)
        assert rec["MESSAGE"] == "cim_provider.test_journal: " + big
        assert rec["PRIORITY"] == "7"
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_journal_target_without_journal_is_exit_2(tmp_path):
    proc = _failing_manager({logsetup.JOURNAL_SOCKET_ENV: str(tmp_path / "none")},
                            "--log-target", "journal")
    assert proc.returncode == 2
    assert proc.stderr.startswith("cim-provider: cannot log to journal") and "Traceback" not in proc.stderr


def test_stderr_connected_to_the_journal_upgrades_to_native(dgram, tmp_path, monkeypatch):
    sock, path = dgram
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.setenv(logsetup.JOURNAL_SOCKET_ENV, str(path))
    assert logsetup.default_target() == "journal"
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert logsetup.default_target() == "stderr"


# --- syslog -------------------------------------------------------------------------

def test_syslog_target(dgram):
    sock, path = dgram
    proc = _failing_manager({logsetup.SYSLOG_SOCKET_ENV: str(path)}, "--log-target", "syslog",
                            "--log-level", "error")
    assert proc.returncode == 1 and proc.stderr == ""
    data = sock.recv(65536)
    # <PRI> = facility daemon (3) * 8 + err (3) = 27; tag with the pid; NUL-terminated
    m = re.match(rb"^<27>cim-provider\[(\d+)\]: cim_provider\.manager\.cli: cannot serve the Manager",
                 data)
    assert m, data


# --- stderr and libvirt's own printing ------------------------------------------------

def test_manager_routes_libvirt_errors_through_logging(tmp_path):
    """libvirt prints "libvirt: XML-RPC error : ..." on stderr unless a handler is
    registered: with an unreachable URI the Manager's stderr holds our lines only."""
    from cim_provider.busdaemon import PrivateBus
    bus = PrivateBus()
    svc = Service(tmp_path, ["manager", "--bus", bus.address,
                             "--store", f"sqlite:{tmp_path}/m.db",
                             "--libvirt-uri", f"qemu+unix:///system?socket={tmp_path}/no-libvirt",
                             "--poll-interval", "0.1"], notify=False)
    try:
        svc.wait_log("serving org.example.virt")
        time.sleep(1.0)                           # ~10 polls of the unreachable libvirt
        svc.signal(signal.SIGTERM)
        assert svc.proc.wait(15) == 0
    finally:
        svc.stop()
        bus.stop()
    text = svc.log_text()
    assert "no-libvirt" in text                     # the failure was seen ...
    for line in text.splitlines():                  # ... and only logged, in our format
        assert re.match(LOG_LINE, line), line
    assert "XML-RPC error" not in text


def test_stderr_format_and_level(tmp_path):
    proc = _failing_manager({}, "--log-level", "warning")
    lines = proc.stderr.splitlines()
    assert lines and all(re.match(LOG_LINE, line) for line in lines), proc.stderr
    assert not any(" INFO " in line or " DEBUG " in line for line in lines)


def test_set_level_returns_the_previous_one():
    root = logging.getLogger()
    saved = root.level
    try:
        root.setLevel(logging.INFO)
        assert logsetup.set_level("debug") == "INFO"
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(saved)


def test_priority_mapping():
    assert [logsetup.priority(x) for x in (5, 10, 20, 30, 40, 50)] == [7, 7, 6, 4, 3, 2]
