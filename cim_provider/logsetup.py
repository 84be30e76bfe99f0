"""Where the log goes: stderr, the systemd journal or syslog (`--log-target`), and at
which level (`--log-level`, changeable while running).

- stderr: `2024-01-31 12:00:00,000 INFO cim_provider.x: message`, one record a line.
- journal: journald's native protocol (sd_journal_send(3)): one datagram of fields per
  record to /run/systemd/journal/socket -- MESSAGE, PRIORITY, SYSLOG_IDENTIFIER,
  CODE_FILE/CODE_LINE/CODE_FUNC, LOGGER, THREAD_NAME -- so `journalctl -p err` and
  `journalctl LOGGER=...` work. A record too large for a datagram goes in a sealed
  memfd passed along (as libsystemd does). Written here rather than taken from
  systemd-python, which needs libsystemd's headers and a compiler to install and cannot
  be pointed at another socket for tests.
- syslog: RFC 3164 datagrams to /dev/log (the stdlib's SysLogHandler), facility daemon,
  tag `cim-provider[PID]`.

Without `--log-target`, a process whose stderr is connected to the journal (systemd
sets $JOURNAL_STREAM to its device:inode) logs natively to the journal, else to stderr.
`CIM_PROVIDER_JOURNAL_SOCKET` / `CIM_PROVIDER_SYSLOG_SOCKET` name other sockets (tests).
"""
from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TARGETS = ("stderr", "journal", "syslog")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
IDENTIFIER = "cim-provider"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
JOURNAL_SOCKET_ENV = "CIM_PROVIDER_JOURNAL_SOCKET"
SYSLOG_SOCKET_ENV = "CIM_PROVIDER_SYSLOG_SOCKET"

# logging level -> syslog priority (journal PRIORITY=)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def level_name(value: str) -> str:
    """argparse type for --log-level: any case; the choices check follows."""
    return value.upper()


def priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def journal_fields(fields: dict[str, str]) -> bytes:
    """The native protocol: `KEY=value\\n`, or for a value with a newline
    `KEY\\n` + its length (64-bit little endian) + the value + `\\n`."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Records to journald over its native socket."""

    def __init__(self, path: str | None = None, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.path = path or os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        if not stat.S_ISSOCK(os.stat(self.path).st_mode):
            raise OSError(errno.ENOTSOCK, f"{self.path} is not a socket")
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        return {"MESSAGE": self.format(record), "PRIORITY": str(priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier, "SYSLOG_FACILITY": "3",   # daemon
                "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName, "LOGGER": record.name,
                "THREAD_NAME": record.threadName or ""}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(journal_fields(self.fields(record)))
        except Exception:
            self.handleError(record)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """Too large for a datagram: the fields in a sealed memfd, the fd passed alone."""
        fd = os.memfd_create("journal-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            os.lseek(fd, 0, os.SEEK_SET)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            super().close()


def syslog_handler(path: str | None = None) -> logging.Handler:
    import logging.handlers             # only for this target: ~15 ms of every start-up
    handler = logging.handlers.SysLogHandler(
        address=path or os.environ.get(SYSLOG_SOCKET_ENV) or SYSLOG_SOCKET,
        facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    handler.ident = f"{IDENTIFIER}[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal ($JOURNAL_STREAM)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def default_target() -> str:
    if stderr_is_journal():
        path = os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        if os.path.exists(path):
            return "journal"
    return "stderr"


def make_handler(target: str | None) -> logging.Handler:
    """OSError when the journal or syslog socket is not there."""
    target = target or default_target()
    if target == "journal":
        return JournalHandler()
    if target == "syslog":
        return syslog_handler()
    if target != "stderr":
        raise ValueError(f"unknown log target {target!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def configure(level: str = "INFO", target: str | None = None) -> logging.Handler:
    """Route the root logger to `target` only, at `level`; OSError as make_handler."""
    handler = make_handler(target)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> str:
    """Change the level of the running process (SIGHUP); the previous one's name."""
    root = logging.getLogger()
    before = logging.getLevelName(root.level)
    root.setLevel(level.upper())
    return before
