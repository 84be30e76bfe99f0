"""Acceptance (live hot-plug) on a real hypervisor: QEMU (TCG, no guest OS) under a
private, unprivileged libvirtd with only the qemu driver. libvirt's test driver cannot
hot-plug at all, so this is where AddResourceSettings, RemoveResourceSettings and
ModifyResourceSettings of a running system are seen in libvirt's own XML (XMLDesc,
what `virsh dumpxml` prints; live and persistent), on the next read, and where a
device attached behind the server's back appears by libvirt's device events.

Needs qemu-system-x86_64 (Debian: qemu-system-x86) and, as root, setpriv to run the
daemon as `nobody`; skipped otherwise. Without a guest OS nothing acknowledges a PCI
unplug, so a NIC cannot be removed live: that answer is checked too. Disks on the
virtio-scsi bus need no acknowledgement.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, CIMProperty, Uint16

try:
    from tests.support.lvserver import LibvirtServer
    from tests.support.model import (CS, EPASD, SASD, VIRT, cim_error, iid_path, vsms_path,
                                      vssd_path)
except ImportError:
    from support.lvserver import LibvirtServer  # type: ignore
    from support.model import (CS, EPASD, SASD, VIRT, cim_error, iid_path,  # type: ignore
                               vsms_path, vssd_path)

QEMU = shutil.which("qemu-system-x86_64")
LIBVIRTD = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
SETPRIV = shutil.which("setpriv")

pytestmark = pytest.mark.skipif(
    QEMU is None or not DRIVER.exists() or (os.geteuid() == 0 and SETPRIV is None),
    reason="needs qemu-system-x86_64, libvirt's qemu driver (and setpriv as root)")

MAC0, MAC1 = "52:54:00:51:00:01", "52:54:00:51:00:02"
INACTIVE = 2          # VIR_DOMAIN_XML_INACTIVE


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


def domain_xml(uuid: str, name: str, disk: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
            f"<devices><emulator>{QEMU}</emulator>"
            "<controller type='scsi' model='virtio-scsi'/>"
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='sda' bus='scsi'/></disk>"
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            "<target dev='sdc' bus='scsi'/><readonly/></disk>"
            f"<interface type='user'><mac address='{MAC0}'/><model type='virtio'/></interface>"
            "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>"
            "<memballoon model='virtio'/></devices></domain>")


@pytest.fixture(scope="module")
def qemu():
    daemon = QemuDaemon()
    try:
        daemon.start()
    except Exception as exc:       # a host where unprivileged qemu cannot run
        daemon.stop()
        pytest.skip(f"no private qemu libvirtd here: {exc}")
    srv = None
    try:
        srv = LibvirtServer(daemon.uri, metrics_interval=0.5)
        uuid = str(uuidlib.uuid4())
        dom = srv.libvirt.defineXML(domain_xml(uuid, "hot", daemon.image("root.img")))
        dom.create()
        srv.wait(lambda: srv.inventory.get(uuid) is not None, what="the qemu guest")
        yield daemon, srv, dom, uuid
    finally:
        if srv is not None:
            try:
                for d in srv.libvirt.listAllDomains():
                    if d.isActive():
                        d.destroy()
                    if d.isPersistent():
                        d.undefine()
            except Exception:
                pass
            srv.close()
        daemon.stop()


def device(cls, uuid, dev):
    return CIMInstanceName(cls, {"SystemCreationClassName": CS, "SystemName": uuid,
                                 "CreationClassName": cls, "DeviceID": dev}, namespace=VIRT)


def xml_targets(dom, flags=0):
    root = ET.fromstring(dom.XMLDesc(flags))
    return ({t.get("dev") for t in root.findall("devices/disk/target")},
            {m.get("address") for m in root.findall("devices/interface/mac")})


def add(conn, uuid, rasds):
    rv, out = conn.InvokeMethod("AddResourceSettings", vsms_path(),
                                AffectedConfiguration=vssd_path("state", uuid),
                                ResourceSettings=list(rasds))
    return int(rv), out.get("ResultingResourceSettings")


def test_devices_of_a_qemu_guest(qemu):
    _daemon, srv, dom, uuid = qemu
    c = srv.conn()
    disks, nics = xml_targets(dom)
    devs = c.AssociatorNames(CIMInstanceName(CS, {"CreationClassName": CS, "Name": uuid},
                                             namespace=VIRT), AssocClass="VIRT_SystemDevice")
    assert {d["DeviceID"] for d in devs if d.classname == "VIRT_LogicalDisk"} == disks
    assert {d["DeviceID"] for d in devs if d.classname == "VIRT_NetworkPort"} == nics
    graphics = ET.fromstring(dom.XMLDesc(0)).find("devices/graphics")
    vnc = c.GetInstance(device("VIRT_DisplayController", uuid, "vnc0"))
    assert (vnc["GraphicsType"], vnc["RemotePort"], vnc["ListenAddress"]) == \
        ("vnc", int(graphics.get("port")), "127.0.0.1")
    assert vnc["RemotePort"] >= 5900
    sda = c.GetInstance(device("VIRT_LogicalDisk", uuid, "sda"))
    assert sda["BlockSize"] * sda["NumberOfBlocks"] == dom.blockInfo("sda")[0]


def test_hot_plug_a_disk_and_a_nic_into_a_running_guest(qemu):
    daemon, srv, dom, uuid = qemu
    c = srv.conn()
    image = daemon.image("data.img", 2 << 20)
    rv, paths = add(c, uuid, [
        CIMInstance(SASD, properties={"ResourceType": Uint16(17), "Address": "sdb",
                                      "ResourceSubType": "scsi", "HostResource": [image]}),
        CIMInstance(EPASD, properties={"ResourceType": Uint16(10), "Address": MAC1,
                                       "OtherResourceType": "user",
                                       "ResourceSubType": "virtio"})])
    assert rv == 0
    assert [p["InstanceID"] for p in paths] == [f"VIRT:state:{uuid}/sdb",
                                                f"VIRT:state:{uuid}/{MAC1}"]
    # libvirt's own XML, live and persistent (the guest is persistent)
    for flags in (0, INACTIVE):
        disks, nics = xml_targets(dom, flags)
        assert "sdb" in disks and MAC1 in nics, flags
    # the next read
    assert c.GetInstance(device("VIRT_LogicalDisk", uuid, "sdb"))["NumberOfBlocks"] == \
        (2 << 20) // 512
    assert c.GetInstance(device("VIRT_NetworkPort", uuid, MAC1))["PermanentAddress"] == MAC1
    assert c.GetInstance(paths[0])["HostResource"] == [image]

    # ModifyResourceSettings: the NIC's link goes down, live and persistent
    epasd = c.GetInstance(paths[1])
    epasd["LinkState"] = Uint16(3)
    rv, _ = c.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[epasd])
    assert int(rv) == 0
    for flags in (0, INACTIVE):
        nic = next(n for n in ET.fromstring(dom.XMLDesc(flags)).findall("devices/interface")
                   if n.find("mac").get("address") == MAC1)
        assert nic.find("link").get("state") == "down", flags
    assert c.GetInstance(device("VIRT_NetworkPort", uuid, MAC1))["LinkState"] == 3

    # removal of the disk (virtio-scsi: no guest acknowledgement needed)
    rv, _ = c.InvokeMethod("RemoveResourceSettings", vsms_path(), ResourceSettings=[paths[0]])
    assert int(rv) == 0
    for flags in (0, INACTIVE):
        assert "sdb" not in xml_targets(dom, flags)[0]
    err = cim_error(lambda: c.GetInstance(device("VIRT_LogicalDisk", uuid, "sdb")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND

    # a NIC is a PCI device: without a guest OS nothing releases it. Said so, and the
    # persistent definition keeps it.
    err = cim_error(lambda: c.InvokeMethod("RemoveResourceSettings", vsms_path(),
                                           ResourceSettings=[paths[1]]))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert "has not done so" in err.status_description
    assert MAC1 in xml_targets(dom, INACTIVE)[1]


def test_cdrom_media_change(qemu):
    daemon, srv, dom, uuid = qemu
    c = srv.conn()
    iso = daemon.image("media.iso", 1 << 20)
    path = iid_path(SASD, f"VIRT:state:{uuid}/sdc")
    sasd = c.GetInstance(path)
    assert sasd["ResourceType"] == 16 and sasd.get("HostResource") is None
    sasd["HostResource"] = [iso]
    rv, _ = c.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[sasd])
    assert int(rv) == 0
    cdrom = next(d for d in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk")
                 if d.find("target").get("dev") == "sdc")
    assert cdrom.find("source").get("file") == iso
    assert c.GetInstance(path)["HostResource"] == [iso]
    sasd["HostResource"] = CIMProperty("HostResource", None, type="string", is_array=True)
    rv, _ = c.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[sasd])
    assert int(rv) == 0
    cdrom = next(d for d in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk")
                 if d.find("target").get("dev") == "sdc")
    assert cdrom.find("source") is None or cdrom.find("source").get("file") is None


def test_a_failed_live_attach_changes_nothing(qemu):
    """qemu (running as nobody) cannot open a root-only image: the live attach fails,
    and the persistent definition stays as it was."""
    daemon, srv, dom, uuid = qemu
    if os.geteuid() != 0:
        pytest.skip("needs an image the daemon's user cannot read")
    c = srv.conn()
    secret = daemon.image("secret.img", mode=0o600, owner=False)
    live, config = dom.XMLDesc(0), dom.XMLDesc(INACTIVE)
    err = cim_error(lambda: add(c, uuid, [CIMInstance(SASD, properties={
        "ResourceType": Uint16(17), "Address": "sdd", "HostResource": [secret]})]))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert (dom.XMLDesc(0), dom.XMLDesc(INACTIVE)) == (live, config)
    err = cim_error(lambda: c.GetInstance(device("VIRT_LogicalDisk", uuid, "sdd")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND


def test_a_device_attached_elsewhere_appears_within_a_second(qemu):
    """Attached through libvirt directly (another client): the device-added event
    makes the server read the guest again."""
    daemon, srv, dom, uuid = qemu
    c = srv.conn()
    image = daemon.image("outside.img")
    xml = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
           f"<source file='{image}'/><target dev='sde' bus='scsi'/></disk>")
    t0 = time.monotonic()
    dom.attachDeviceFlags(xml, 1)          # VIR_DOMAIN_AFFECT_LIVE
    path = device("VIRT_LogicalDisk", uuid, "sde")
    while True:
        try:
            c.GetInstance(path)
            break
        except pywbem.CIMError:
            assert time.monotonic() - t0 < 1.0, "not seen within a second"
            time.sleep(0.02)
    dom.detachDeviceFlags(xml, 1)
    t0 = time.monotonic()
    while True:
        try:
            c.GetInstance(path)
        except pywbem.CIMError:
            break
        assert time.monotonic() - t0 < 1.0, "still seen a second after the removal"
        time.sleep(0.02)


def test_metrics_of_a_qemu_guest(qemu):
    """With QEMU the bulk statistics carry everything: one getAllDomainStats per sample."""
    _daemon, srv, _dom, uuid = qemu
    start = srv.on_loop(lambda: srv.resources.samples)
    srv.wait(lambda: srv.resources.samples >= start + 2, what="two samples")
    c = srv.conn()
    values = {v["MetricDefinitionId"]: v for v in c.EnumerateInstances("VIRT_BaseMetricValue")
              if v["InstanceID"].startswith(f"VIRT:metric:{uuid}:")}
    assert {"VIRT:metric:cpu", "VIRT:metric:memory", "VIRT:metric:disk-read"} <= set(values)
    assert 0.0 <= float(values["VIRT:metric:cpu"]["MetricValue"]) <= 100.0
