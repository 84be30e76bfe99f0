"""The audit trail: one line per modifying operation on the `cim_provider.audit`
logger, and with `--audit-log FILE` the same record appended to FILE as a JSON line.

The dispatcher builds the records (wbem/audit.py: secrets already masked, long values
cut); this module formats and writes them. The file is opened in append mode with
mode 0600 when created (an existing file keeps its mode, so logrotate's `create` rules
apply), and reopened by `reopen()`, which `serve` runs on SIGHUP (ServerHandle.on_reload):
after logrotate has moved the file away, the next record goes to a new one.

Each record is written with one write() to an O_APPEND descriptor, unbuffered: a line
is never split, and it is on disk (in the page cache) when the operation's answer
leaves. The write happens on the event loop; modifying operations are rare and a
line is a few hundred bytes, so a thread would cost more than it saves.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from pathlib import Path

from ..wbem.audit import AuditRecord
from .security import StartupError

log = logging.getLogger("cim_provider.audit")
_errors = logging.getLogger(__name__)


class AuditLogError(StartupError):
    """The audit file cannot be opened; str() says which and why."""


def _timestamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _word(value: str) -> str:
    """`value` as is when it is one plain word, else JSON-quoted."""
    if value and all(c.isprintable() and not c.isspace() and c not in '"\\' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def format_line(rec: AuditRecord) -> str:
    """The log line: time, user, client, operation, target, parameters, result. The
    target and the summaries come escaped from wbem/audit.py (one line, whatever the
    client sent); user and client are quoted when they are not one plain word."""
    op = rec.operation if rec.method is None else f"{rec.operation} {_word(rec.method)}"
    params = ", ".join(f"{k}={v}" for k, v in rec.params.items())
    return (f"{_timestamp(rec.time)} user={_word(rec.user)} client={_word(rec.client)} "
            f"{op} {rec.target}" + (f" ({params})" if params else "")
            + f" -> {rec.result}")


def as_json(rec: AuditRecord) -> str:
    """One JSON object on one line (no newline inside: values are escaped)."""
    return json.dumps({
        "time": _timestamp(rec.time), "user": rec.user, "client": rec.client,
        "operation": rec.operation, "method": rec.method, "namespace": rec.namespace,
        "target": rec.target, "params": rec.params, "ok": rec.ok, "result": rec.result,
        "return_value": rec.return_value, "created": rec.created,
        "error_code": rec.error_code, "error_name": rec.error_name,
    }, ensure_ascii=False, separators=(",", ":"))


class AuditLog:
    """The dispatcher's audit hook: logs each record, and appends it to `path`."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else None
        self._fd: int | None = None
        self._lock = threading.Lock()       # reopen() may come from another thread
        self._failing = False
        if self.path is not None:
            self._fd = self._open()

    def _open(self) -> int:
        assert self.path is not None
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        except OSError as exc:
            raise AuditLogError(f"--audit-log {self.path}: cannot open it for appending "
                                f"({exc.strerror})") from None

    def __call__(self, rec: AuditRecord) -> None:
        log.info("%s", format_line(rec))
        if self._fd is None:
            return
        data = (as_json(rec) + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                if self._fd is not None:
                    os.write(self._fd, data)
                self._failing = False
            except OSError as exc:
                if not self._failing:        # once per outage, not once per record
                    _errors.error("cannot append to the audit log %s: %s", self.path,
                                  exc.strerror)
                self._failing = True

    def reopen(self) -> None:
        """Open the file again by its name (after logrotate); keep the old one if the
        new cannot be opened, and say so."""
        if self.path is None:
            return
        try:
            fd = self._open()
        except AuditLogError as exc:
            _errors.error("%s; still writing to the file open before", exc)
            return
        with self._lock:
            old, self._fd = self._fd, fd
            self._failing = False
        if old is not None:
            os.close(old)
        _errors.info("audit log %s reopened", self.path)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
