"""A private `dbus-daemon` for the demo, the benchmark and the tests.

A throw-away configuration lets anyone own any name on a socket in a temporary
directory, so nothing touches the system or session bus.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """A running private bus; `address` is what clients connect to."""

    def __init__(self, socket: Path | None = None) -> None:
        """`socket`: where to listen (to restart a bus at the same address); default
        a fresh temporary directory."""
        exe = shutil.which("dbus-daemon")
        if exe is None:
            raise RuntimeError("dbus-daemon is not installed (run `make setup`)")
        self._dir = Path(tempfile.mkdtemp(prefix="cim-dbus-"))
        config = self._dir / "bus.conf"
        config.write_text(_CONFIG.format(socket=socket or self._dir / "bus"))
        self.proc = subprocess.Popen(
            [exe, f"--config-file={config}", "--nofork", "--print-address=1", "--nopidfile"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"dbus-daemon did not start: {err}")
        self.address = line

    def env(self) -> dict[str, str]:
        """Environment for a child process that should use this bus as both buses."""
        env = dict(os.environ)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.address
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return env

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        shutil.rmtree(self._dir, ignore_errors=True)
