"""contrib/systemd/: both units pass `systemd-analyze verify` and say what an admin
expects (Type=notify with reload, Type=dbus with the bus name, the hardening); the
D-Bus policy and activation files they refer to are well-formed.

`systemd-analyze verify` insists that ExecStart's binary exists: each unit is verified
as a copy whose ExecStart names this checkout's .venv/bin/cim-provider (the shipped
path, /usr/local/bin/cim-provider, too when it exists), the rest of the file unchanged.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

try:
    from tests.support.wbem_server import CIM_PROVIDER, ROOT
except ImportError:
    from support.wbem_server import CIM_PROVIDER, ROOT  # type: ignore

UNITS = ROOT / "contrib" / "systemd"
SHIPPED_BINARY = "/usr/local/bin/cim-provider"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def settings(unit: Path) -> dict[str, list[str]]:
    """KEY -> values of a unit file (comments and sections ignored)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit: Path, tmp_path: Path, binary: str) -> subprocess.CompletedProcess:
    (tmp_path / "verify").mkdir(exist_ok=True)
    copy = tmp_path / "verify" / unit.name
    copy.write_text(unit.read_text().replace(SHIPPED_BINARY, binary))
    assert Path(SYSTEMD_ANALYZE).exists(), "systemd-analyze is missing: run `make setup`"
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["cim-provider.service", "cim-provider-manager.service"])
def test_systemd_analyze_verify(name, tmp_path):
    unit = UNITS / name
    assert f"ExecStart={SHIPPED_BINARY} " in unit.read_text()
    proc = verify(unit, tmp_path, str(CIM_PROVIDER))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    if Path(SHIPPED_BINARY).exists():
        proc = verify(unit, tmp_path, SHIPPED_BINARY)
        assert proc.returncode == 0, proc.stderr


def test_verify_can_fail(tmp_path):
    """The check itself: a dbus unit without its bus name is refused."""
    bad = tmp_path / "broken.service"
    text = (UNITS / "cim-provider-manager.service").read_text()
    bad.write_text(re.sub(r"^BusName=.*$", "", text, flags=re.M))
    proc = verify(bad, tmp_path, str(CIM_PROVIDER))
    assert proc.returncode != 0 and "D-Bus service name" in proc.stderr


HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
             "PrivateTmp": "yes"}


def test_server_unit():
    s = settings(UNITS / "cim-provider.service")
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [f"{SHIPPED_BINARY} serve"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for key, value in HARDENING.items():
        assert s[key] == [value], key
    assert s["ReadWritePaths"] == ["/var/lib/cim-provider /var/cache/cim-provider"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    text = (UNITS / "cim-provider.service").read_text()
    assert "libvirt socket" in text        # why AF_UNIX (and root) is needed


def test_manager_unit_and_bus_files():
    s = settings(UNITS / "cim-provider-manager.service")
    assert s["Type"] == ["dbus"] and s["BusName"] == ["org.example.virt"]
    assert s["ExecStart"] == [f"{SHIPPED_BINARY} manager"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for key, value in HARDENING.items():
        assert s[key] == [value], key
    text = (UNITS / "cim-provider-manager.service").read_text()
    # where the bus policy goes, and that it is the one the package carries
    policy = ROOT / "cim_provider" / "manager" / "org.example.virt.conf"
    assert "/etc/dbus-1/system.d/" in text and "/usr/share/dbus-1/system.d/" in text
    assert "cim_provider/manager/org.example.virt.conf" in text and policy.exists()
    owns = [p.get("own") for p in ET.parse(policy).iter("allow") if p.get("own")]
    assert owns == ["org.example.virt"]
    # D-Bus activation goes through the unit's Alias
    activation = (ROOT / "contrib" / "dbus" / "org.example.virt.service").read_text()
    assert "Name=org.example.virt" in activation
    alias = s["Alias"][0]
    assert f"SystemdService={alias}" in activation
