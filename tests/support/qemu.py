"""A private, unprivileged libvirtd with only the qemu driver, and the tiny TCG guests the
qemu test tier runs under it (pytest marker `qemu`).

Nothing of the host's libvirt is touched: the daemon runs in session mode under a
directory of its own, as `nobody` (setpriv) when the tests run as root. Needs
qemu-system-x86_64 (Debian: qemu-system-x86) and libvirt's qemu driver, both installed by
scripts/sysdeps.sh; `needs_qemu` skips, saying why, on a machine without them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

QEMU = shutil.which("qemu-system-x86_64")
LIBVIRTD = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
SETPRIV = shutil.which("setpriv")

needs_qemu = pytest.mark.skipif(
    QEMU is None or not DRIVER.exists() or (os.geteuid() == 0 and SETPRIV is None),
    reason="needs qemu-system-x86_64, libvirt's qemu driver (and setpriv as root)")


class QemuDaemon:
    """libvirtd with the qemu driver only, in session mode under a directory of its own;
    as root it runs as `nobody` (setpriv), so nothing of the host's libvirt is touched."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lvq-"))
        self.sock = self.dir / "sock" / "libvirt-sock"
        self.images = self.dir / "images"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.sock}"

    def start(self) -> None:
        for sub in ("sock", "home", "drivers", "images"):
            (self.dir / sub).mkdir()
        (self.dir / "drivers" / DRIVER.name).symlink_to(DRIVER)
        (self.dir / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.dir / "sock"}"\nunix_sock_rw_perms = "0777"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\nlisten_tls = 0\nlisten_tcp = 0\n'
            f'log_outputs = "3:file:{self.dir / "libvirtd.log"}"\n')
        home = str(self.dir / "home")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "XDG_RUNTIME_DIR": home,
               "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home,
               "LIBVIRT_DRIVER_DIR": str(self.dir / "drivers")}
        cmd = [LIBVIRTD, "--config", str(self.dir / "libvirtd.conf")]
        if os.geteuid() == 0:
            assert SETPRIV is not None        # needs_qemu skips otherwise
            shutil.chown(self.dir, "nobody", "nogroup")
            for path in self.dir.rglob("*"):
                os.lchown(path, 65534, 65534)
            cmd = [SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd (qemu) did not start: {self.log()}")
            time.sleep(0.05)

    def image(self, name: str, size: int = 1 << 20, mode: int = 0o644, owner: bool = True) -> str:
        """A raw image the daemon's qemu can use (owner False: one it cannot open)."""
        path = self.images / name
        with open(path, "wb") as f:
            f.truncate(size)
        os.chmod(path, mode)
        if owner and os.geteuid() == 0:
            os.chown(path, 65534, 65534)
        return str(path)

    def log(self) -> str:
        try:
            return (self.dir / "libvirtd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def tiny_xml(uuid: str, name: str, vcpus: str = "<vcpu>1</vcpu>", acpi: bool = False) -> str:
    """A guest with nothing to boot (64 MiB, no disk): it sits in the firmware, so
    nothing in it answers an ACPI shutdown or reboot."""
    features = "<features><acpi/></features>" if acpi else ""
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<memory unit='MiB'>64</memory>{vcpus}"
            f"<os><type arch='x86_64' machine='pc'>hvm</type></os>{features}"
            f"<devices><emulator>{QEMU}</emulator><memballoon model='none'/></devices>"
            "</domain>")


def qemu_pid(uuid: str) -> int:
    """The pid of the QEMU process running `uuid` (its command line names the UUID)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and uuid.encode() in args:
            return int(entry)
    raise AssertionError(f"no qemu process for {uuid}")


def wait_running(srv: Any, uuid: str) -> None:
    """Until the server's inventory shows `uuid` running."""
    srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is not None
             and r.running.state.name == "RUNNING", what="the qemu guest running")


@contextlib.contextmanager
def qemu_server(**server_options: Any) -> Iterator[tuple[QemuDaemon, Any]]:
    """A private qemu libvirtd and a server fed by it alone (tests/support/lvserver.py,
    `server_options` passed on); skips the test when this host cannot run the daemon.
    At the end every guest is resumed (a test may have stopped its QEMU with SIGSTOP),
    destroyed and undefined before the daemon stops."""
    try:
        from tests.support.lvserver import LibvirtServer
    except ImportError:
        from support.lvserver import LibvirtServer  # type: ignore
    daemon = QemuDaemon()
    try:
        daemon.start()
    except Exception as exc:       # a host where unprivileged qemu cannot run
        daemon.stop()
        pytest.skip(f"no private qemu libvirtd here: {exc}")
    srv = None
    try:
        srv = LibvirtServer(daemon.uri, **server_options)
        yield daemon, srv
    finally:
        if srv is not None:
            try:
                for d in srv.libvirt.listAllDomains():
                    with contextlib.suppress(AssertionError, OSError):
                        os.kill(qemu_pid(d.UUIDString()), signal.SIGCONT)
                    if d.isActive():
                        d.destroy()
                    if d.isPersistent():
                        d.undefine()
            except Exception:
                pass
            srv.close()
        daemon.stop()


def start_guest(srv: Any, name: str, xml: str | None = None) -> tuple[str, Any]:
    """Define and start a guest (default: tiny_xml with ACPI) under `srv`'s libvirt;
    (UUID, virDomain) once the server shows it running. `xml`: a template with
    {uuid} and {name} fields instead."""
    import uuid as uuidlib
    uuid = str(uuidlib.uuid4())
    text = tiny_xml(uuid, name, acpi=True) if xml is None else xml.format(uuid=uuid, name=name)
    dom = srv.libvirt.defineXML(text)
    dom.create()
    wait_running(srv, uuid)
    return uuid, dom
