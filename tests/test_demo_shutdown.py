"""`cim-provider demo` stops quietly on SIGTERM (issue 12).

The demo runs as a subprocess in a session of its own, with its private dbus-daemon as a
child. SIGTERM goes either to the demo alone or to its whole process group, as a
terminal or a service manager sends it: then the dbus-daemon ends at the same moment and
every bus connection of the demo sees its end (dbus-fast: EOFError). Either way the demo
exits 0 and writes no traceback.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIM_PROVIDER = ROOT / ".venv" / "bin" / "cim-provider"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("target", ["the demo", "its process group"])
def test_sigterm_stops_the_demo_quietly(tmp_path, target):
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [str(CIM_PROVIDER), "demo", "--listen", f"127.0.0.1:{free_port()}",
             "--https-listen", f"127.0.0.1:{free_port()}"],
            stdout=o, stderr=e, cwd=str(tmp_path), env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "cim-provider demo is serving" not in out.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.05)
        if target == "the demo":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = err.read_text()
    assert code == 0, text
    assert "Traceback" not in text and "never retrieved" not in text, text
