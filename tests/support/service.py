"""`cim-provider serve` / `manager` as a service manager runs them: a real subprocess,
$NOTIFY_SOCKET on a datagram socket we read (as systemd would), signals, and its log.

The configuration file is always explicit (`--config`) or none: $CIM_PROVIDER_CONFIG=""
keeps a /etc/cim-provider/cim-provider.toml of the machine out of the tests.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

try:
    from tests.support.wbem_server import CIM_PROVIDER, ROOT
except ImportError:  # tests/ itself on sys.path
    from support.wbem_server import CIM_PROVIDER, ROOT  # type: ignore

# "2024-01-31 12:00:00,123 INFO cim_provider.x.y: message": our stderr format
LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def recv(self, timeout: float = 30.0) -> dict[str, str]:
        """The next notification as {KEY: value}; TimeoutError if none comes."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no notification") from None
        out = {}
        for line in data.decode().split("\n"):
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def pending(self) -> list[dict[str, str]]:
        """Notifications already queued (without waiting)."""
        out = []
        while True:
            try:
                out.append(self.recv(0.05))
            except TimeoutError:
                return out

    def close(self) -> None:
        self.sock.close()


class Service:
    """`cim-provider ARGS...` with stderr to a file and $NOTIFY_SOCKET set."""

    def __init__(self, workdir: Path, args: list[str], *, env: dict[str, str] | None = None,
                 notify: bool = True) -> None:
        self.workdir = Path(workdir)
        self.notify = NotifySocket(self.workdir) if notify else None
        self.log_path = self.workdir / "service.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "CIM_PROVIDER_CONFIG": "", **(env or {})}
        if self.notify is not None:
            full_env["NOTIFY_SOCKET"] = self.notify.path
        self.proc = subprocess.Popen([str(CIM_PROVIDER), *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(ROOT), env=full_env)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0, start: int = 0) -> str:
        """Wait until `text` is in the log (from offset `start`); the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log[start:]:
                return log
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in time:\n{log}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def reload(self) -> tuple[dict[str, str], dict[str, str]]:
        """SIGHUP, then the RELOADING=1 and READY=1 notifications that frame it."""
        assert self.notify is not None
        self.signal(signal.SIGHUP)
        reloading = self.notify.recv()
        ready = self.notify.recv()
        return reloading, ready

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        if self.notify is not None:
            self.notify.close()
        return self.proc.returncode


def serve_args(workdir: Path, *extra: str) -> list[str]:
    """`serve` with its sources kept local: libvirt's test driver, no Manager bus."""
    return ["serve", "--libvirt-uri", "test:///default",
            "--manager-bus", f"unix:path={workdir}/no-bus", "--state-dir", str(workdir / "state"),
            *extra]


def make_cert(directory: Path, name: str, serial: int) -> tuple[Path, Path]:
    """A self-signed pair with this serial number (openssl)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                    "-days", "2", "-set_serial", str(serial), "-keyout", str(key),
                    "-out", str(cert), "-subj", f"/CN=cim-provider-test-{serial}",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "OPENSSL_CONF": os.devnull})
    os.chmod(key, 0o600)
    return cert, key
