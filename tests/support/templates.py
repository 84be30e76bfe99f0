"""Three templates for the template tests (issue 15): a small server, a desktop with two
NICs, and one whose disk path is built from the domain's name."""
from __future__ import annotations

from pathlib import Path

SERVER = """{#
A small server: one disk, one NIC.
@var vcpus: int[1..64] = 1 -- virtual CPUs
@var memory_kib: int[16384..] = 262144 -- memory in KiB
@var disk: string = /var/lib/images/server.qcow2 -- its disk image
@var network: string = default -- libvirt network of its NIC
#}
<domain type='{{ hypervisor }}'>
  <name>{{ name }}</name>
  <uuid>{{ uuid }}</uuid>
  <title>Server {{ name }}</title>
  <memory unit='KiB'>{{ memory_kib }}</memory>
  <currentMemory unit='KiB'>{{ memory_kib }}</currentMemory>
  <vcpu>{{ vcpus }}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='{{ disk }}'/><target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='{{ mac(0) }}'/><source network='{{ network }}'/><model type='virtio'/>
    </interface>
  </devices>
</domain>
"""

DESKTOP = """{#
A desktop with two NICs.
@var owner: string -- who it is for
@var vcpus: int[1..16] = 2 -- virtual CPUs
@var memory_kib: int[65536..] = 524288 -- memory in KiB
@var sound: bool = true -- with a sound card
#}
<domain type='{{ hypervisor }}'>
  <name>{{ name }}</name>
  <uuid>{{ uuid }}</uuid>
  <title>Desktop of {{ owner }}</title>
  <memory unit='KiB'>{{ memory_kib }}</memory>
  <vcpu>{{ vcpus }}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/images/desktop-{{ owner|lower }}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='{{ mac(0) }}'/><source network='default'/><model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='{{ mac(1) }}'/><source network='default'/><model type='e1000'/>
    </interface>
{% if sound %}
    <sound model='ich6'/>
{% endif %}
  </devices>
</domain>
"""

NAMED = """{#
One whose disk path is built from the domain's name.
@var images: string = /var/lib/images -- directory of the images
@var memory_kib: int = 131072 -- memory in KiB
@var vcpus: int[1..8] = 1 -- virtual CPUs
#}
<domain type='{{ hypervisor }}'>
  <name>{{ name }}</name>
  <uuid>{{ uuid }}</uuid>
  <memory unit='KiB'>{{ memory_kib }}</memory>
  <vcpu>{{ vcpus }}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='{{ images }}/{{ name }}.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""

TEMPLATES = {"server": SERVER, "desktop": DESKTOP, "named": NAMED}


def write_templates(folder: Path, templates: dict[str, str] = TEMPLATES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in templates.items():
        (folder / f"{name}.xml.j2").write_text(text)
    return folder
