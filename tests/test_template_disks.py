"""A templated definition's disks are resolved like an ordinary definition's (issue 12).

The reference Manager on a private bus, libvirt's test driver, an SQLite store and one
template whose disks are: a qcow2 image made with qemu-img (written `type='file'`, no
driver), a raw image the template calls a block device, a libvirt storage volume, and
the qcow2 image again with a format the template states itself. What the Manager lists
(the contract's Type and Format keys) and the XML libvirt is given at StartDomain carry
the type and image format of each source (manager/disks.py), the stated format kept.
"""
from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import libvirt
import pytest

from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import SqliteStore
from cim_provider.manager.templates import TemplateLibrary
from cim_provider.sources.manager import ManagerClient, ManagerError

try:
    from tests.support import reset_test_driver, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (fixture)
    from tests.support.templates import write_templates
    from tests.test_templates import Signals
except ImportError:          # tests/ itself is on sys.path
    from support import reset_test_driver, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore  # noqa: F401 (fixture)
    from support.templates import write_templates  # type: ignore
    from test_templates import Signals  # type: ignore

QEMU_IMG = shutil.which("qemu-img")
pytestmark = [pytest.mark.dbus,
              pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img (qemu-utils)")]

DISKS = """{#
Four disks, each a different kind of source.
@var image: string -- a qcow2 image
@var raw: string -- a raw image, called a block device here
@var volume: string = missing.img -- a volume of default-pool
#}
<domain type='{{ hypervisor }}'>
  <name>{{ name }}</name>
  <uuid>{{ uuid }}</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='{{ image }}'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='{{ raw }}'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default-pool' volume='{{ volume }}'/><target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{{ image }}'/><target dev='vdd' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


@pytest.fixture
def conn():
    c = libvirt.open("test:///default")
    reset_test_driver(c)
    yield c
    reset_test_driver(c)
    c.close()


def image(path, fmt: str) -> str:
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), "16M"], check=True)
    return str(path)


def disks_of(xml: str) -> dict[str, tuple]:
    """target dev -> (disk type, source attributes, driver type) in domain XML."""
    out = {}
    for d in ET.fromstring(xml).findall("devices/disk"):
        driver = d.find("driver")
        out[d.find("target").get("dev")] = (
            d.get("type"), dict(d.find("source").attrib),
            driver.get("type") if driver is not None else None)
    return out


def test_templated_disks_are_resolved_when_listed_and_at_start(dbus_address, conn, tmp_path):
    qcow2 = image(tmp_path / "guest.qcow2", "qcow2")
    raw = image(tmp_path / "data.img", "raw")
    pool = conn.storagePoolLookupByName("default-pool")
    pool.createXML("<volume><name>vol.qcow2</name><capacity>1048576</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)

    async def scenario():
        store = SqliteStore(tmp_path / "m.db")
        lib = TemplateLibrary(write_templates(tmp_path / "templates", {"disks": DISKS}))
        handle = await serve_manager(dbus_address, [store], conn, poll_interval=0.1,
                                     templates=lib)
        client = ManagerClient(dbus_address, call_timeout=10)
        await client.start()
        sig = await Signals().start(dbus_address)
        try:
            uuid = await client.define_from_template(
                "disks", {"name": "four-disks", "image": qcow2, "raw": raw,
                          "volume": "vol.qcow2"})
            # what the Manager lists: the contract's Type and Format of each disk
            err, (entry,) = await sig.call("GetDomain", "s", [uuid])
            assert err is None
            listed = {d["Target"]: (d.get("Type"), d.get("Format"), d["Source"])
                      for d in entry["Disks"]}
            assert listed == {"vda": ("file", "qcow2", qcow2),
                              "vdb": ("file", "raw", raw),
                              "vdc": ("volume", "qcow2", "default-pool/vol.qcow2"),
                              "vdd": ("file", "raw", qcow2)}     # as the template states
            await client.refresh()
            cfg = client.definitions[uuid]
            assert [(d.source_type, d.format) for d in cfg.disks] == [
                ("file", "qcow2"), ("file", "raw"), ("volume", "qcow2"), ("file", "raw")]

            # StartDomain renders again and resolves again: libvirt gets the formats
            assert await client.start_domain(uuid) == uuid
            started = disks_of(conn.lookupByUUIDString(uuid).XMLDesc(0))
            assert started["vda"] == ("file", {"file": qcow2}, "qcow2")
            assert started["vdb"] == ("file", {"file": raw}, "raw")
            assert started["vdc"] == ("volume", {"pool": "default-pool",
                                                 "volume": "vol.qcow2"}, "qcow2")
            assert started["vdd"] == ("file", {"file": qcow2}, "raw")
            conn.lookupByUUIDString(uuid).destroy()

            # a volume libvirt does not have: the start fails, naming the disk
            other = await client.define_from_template(
                "disks", {"name": "no-volume", "image": qcow2, "raw": raw})
            with pytest.raises(ManagerError) as failed:
                await client.start_domain(other)
            assert "no-volume" in str(failed.value) and "vdc" in str(failed.value)
        finally:
            sig.stop()
            await client.stop()
            await handle.stop()
            store.close()
    run(scenario())
