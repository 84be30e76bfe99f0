"""A private libvirtd for tests: its own config, socket directory and pid file.

It serves the test driver over its unix socket (`test+unix:///default?socket=...`),
so a test can restart a real daemon under a connected client. No hypervisor driver
modules are loaded (LIBVIRT_DRIVER_DIR points at an empty directory): they would
touch system state and fail in a container, and the test driver is built into
libvirt itself. Nothing here talks to a system-wide libvirtd.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class Libvirtd:
    """Start, restart and stop one child libvirtd; use as a context manager."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self.binary = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        # unix socket paths are limited to ~107 bytes: keep this directory short.
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lvd-"))
        self.sock_dir = self.dir / "sock"
        self.socket = self.sock_dir / "libvirt-sock"
        self.config = self.dir / "libvirtd.conf"
        self.log_file = self.dir / "libvirtd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"test+unix:///default?socket={self.socket}"

    def _write_config(self) -> None:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "drivers").mkdir(exist_ok=True)
        self.config.write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            'listen_tls = 0\n'
            'listen_tcp = 0\n'
            'keepalive_interval = 2\n'
            f'log_outputs = "3:file:{self.log_file}"\n')

    def start(self, timeout: float = 15.0) -> None:
        if not os.path.exists(self.binary):
            raise FileNotFoundError("libvirtd is not installed")
        self._write_config()
        env = dict(os.environ)
        env["LIBVIRT_DRIVER_DIR"] = str(self.dir / "drivers")
        if os.geteuid() != 0:   # session mode keeps its state under these
            for var in ("HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
                env[var] = str(self.dir / "home")
        self.proc = subprocess.Popen(
            [self.binary, "--config", str(self.config), "--pid-file", str(self.dir / "pid")],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "ab"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}: "
                                   f"{self._tail()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"libvirtd did not open {self.socket} in {timeout} s: {self._tail()}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def _tail(self) -> str:
        text = ""
        for name in ("stderr.log", "libvirtd.log"):
            try:
                text += (self.dir / name).read_text(errors="replace")[-2000:]
            except OSError:
                pass
        return text

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Libvirtd":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
