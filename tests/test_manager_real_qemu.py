"""The reference Manager against real QEMU (TCG, no guest OS) under a private,
unprivileged libvirtd (tests/support/qemu.py's QemuDaemon): StartDomain's own
--start-timeout (a slow start goes on and is not reported failed), libvirt's real
error reaching the caller, and disks written with the type and format of what their
source is (a qcow2 image, a raw one, a block device)."""
import logging
import os
import shutil
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET

import libvirt
import pytest

from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import LibvirtConnection, SqliteStore
from cim_provider.sources.manager import ManagerClient, ManagerError

try:
    from tests.support import eventually, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (fixture)
    from tests.support.qemu import QemuDaemon, needs_qemu as _needs_qemu
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support import eventually, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore # noqa: F401 (fixture)
    from support.qemu import QemuDaemon, needs_qemu as _needs_qemu  # type: ignore

QEMU_IMG = shutil.which("qemu-img")
pytestmark = [pytest.mark.dbus, pytest.mark.qemu, _needs_qemu]


@pytest.fixture(scope="module")
def daemon():
    d = QemuDaemon()
    try:
        d.start()
    except Exception as exc:       # a host where unprivileged qemu cannot run
        d.stop()
        pytest.skip(f"no private qemu libvirtd here: {exc}")
    try:
        yield d
    finally:
        try:
            conn = libvirt.open(d.uri)
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            conn.close()
        except libvirt.libvirtError:
            pass
        d.stop()


def _cfg(name, disks=()):
    return {"UUID": str(uuidlib.uuid4()), "Name": name, "Type": "QEMU", "OSType": "hvm",
            "Arch": "x86_64", "VCPUs": 1, "MemoryKiB": 65536, "Disks": list(disks)}


async def _serve(address, daemon, tmp_path, **kw):
    conn = LibvirtConnection(daemon.uri)
    handle = await serve_manager(address, [SqliteStore(tmp_path / "m.db")], conn,
                                 poll_interval=0.2, **kw)
    client = ManagerClient(address, call_timeout=60)
    await client.start()
    return handle, client, conn


async def _stop(handle, client, conn):
    await client.stop()
    await handle.stop()
    conn.close()


def _destroy(daemon, uuid):
    conn = libvirt.open(daemon.uri)
    try:
        for dom in conn.listAllDomains():
            if dom.UUIDString() == uuid and dom.isActive():
                dom.destroy()
    finally:
        conn.close()


def _running_xml(daemon, uuid):
    conn = libvirt.open(daemon.uri)
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if dom.UUIDString() == uuid:
                return dom.XMLDesc(0)
        return None
    finally:
        conn.close()


def test_a_start_longer_than_start_timeout_goes_on_and_is_not_reported_failed(
        dbus_address, daemon, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cim_provider.manager")

    async def scenario():
        # a real QEMU start takes far longer than 1 ms
        handle, client, conn = await _serve(dbus_address, daemon, tmp_path,
                                            start_timeout=0.001)
        try:
            props = _cfg("slow")
            uuid = await client.define_domain(props)
            with pytest.raises(ManagerError) as err:
                await client.start_domain(uuid)
            assert err.value.name.endswith(".Failed")
            assert "still in progress" in str(err.value)
            assert "--start-timeout" in str(err.value)
            await eventually(lambda: _running_xml(daemon, uuid) is not None, within=60)
            await eventually(lambda: "after" in caplog.text and "started slow" in caplog.text,
                             within=10)
            assert "starting slow" in caplog.text and "longer than --start-timeout" \
                in caplog.text
            assert (await client.get_domain(uuid)).name == "slow"
            _destroy(daemon, uuid)
        finally:
            await _stop(handle, client, conn)
    run(scenario(), timeout=120)


def test_libvirts_own_error_reaches_the_caller(dbus_address, daemon, tmp_path):
    async def scenario():
        handle, client, conn = await _serve(dbus_address, daemon, tmp_path)
        try:
            missing = str(daemon.images / "no-such-image.qcow2")
            uuid = await client.define_domain(_cfg("broken", [
                {"Target": "vda", "Source": missing, "Bus": "virtio"}]))
            with pytest.raises(ManagerError) as err:
                await client.start_domain(uuid)
            assert err.value.name.endswith(".Failed")
            text = str(err.value)
            assert "libvirt" in text and "no-such-image.qcow2" in text, text
            assert "still in progress" not in text
            assert _running_xml(daemon, uuid) is None
        finally:
            await _stop(handle, client, conn)
    run(scenario(), timeout=120)


def _disk_xml(xml, target):
    for d in ET.fromstring(xml).findall("devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target:
            return d
    raise AssertionError(f"no disk {target} in {xml}")


def _own(path):
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)


@pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img (Debian: qemu-utils)")
def test_file_disks_start_with_their_image_format(dbus_address, daemon, tmp_path):
    qcow2 = str(daemon.images / "sys.qcow2")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", qcow2, "64M"], check=True)
    _own(qcow2)
    raw = daemon.image("data.img", size=2 << 20)

    async def scenario():
        handle, client, conn = await _serve(dbus_address, daemon, tmp_path)
        try:
            uuid = await client.define_domain(_cfg("images", [
                {"Target": "vda", "Source": qcow2, "Bus": "virtio"},
                {"Target": "vdb", "Source": raw, "Bus": "virtio"}]))
            # the definition carries what the sources are
            disks = {d.target: d for d in (await client.get_domain(uuid)).disks}
            assert (disks["vda"].format, disks["vda"].source_type,
                    disks["vda"].capacity_bytes) == ("qcow2", "file", 64 << 20)
            assert (disks["vdb"].format, disks["vdb"].capacity_bytes) == ("raw", 2 << 20)
            await client.start_domain(uuid)
            xml = _running_xml(daemon, uuid)
            vda, vdb = _disk_xml(xml, "vda"), _disk_xml(xml, "vdb")
            assert vda.get("type") == "file" and vda.find("driver").get("type") == "qcow2"
            assert vda.find("source").get("file") == qcow2
            assert vdb.find("driver").get("type") == "raw"
            _destroy(daemon, uuid)
        finally:
            await _stop(handle, client, conn)
    run(scenario(), timeout=120)


def _loop_device(image):
    """A loop device over `image`, or a reason why there is none here."""
    losetup = shutil.which("losetup")
    if losetup is None:
        return None, "losetup is not installed"
    if os.geteuid() != 0:
        return None, "losetup needs root"
    out = subprocess.run([losetup, "--find", "--show", image], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        return None, f"losetup cannot attach a loop device here: {out.stderr.strip()}"
    return out.stdout.strip(), None


@pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img (Debian: qemu-utils)")
def test_a_block_device_is_a_block_disk(dbus_address, daemon, tmp_path):
    image = str(tmp_path / "backing.img")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", image, "8M"], check=True)
    dev, why = _loop_device(image)
    if dev is None:
        pytest.skip(why)
    try:
        _own(dev)

        async def scenario():
            handle, client, conn = await _serve(dbus_address, daemon, tmp_path)
            try:
                uuid = await client.define_domain(_cfg("blocky", [
                    {"Target": "vda", "Source": dev, "Bus": "virtio"}]))
                disk = (await client.get_domain(uuid)).disks[0]
                assert (disk.source_type, disk.format) == ("block", "raw")
                await client.start_domain(uuid)
                vda = _disk_xml(_running_xml(daemon, uuid), "vda")
                assert vda.get("type") == "block"
                assert vda.find("source").get("dev") == dev
                assert vda.find("driver").get("type") == "raw"
                _destroy(daemon, uuid)
            finally:
                await _stop(handle, client, conn)
        run(scenario(), timeout=120)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
