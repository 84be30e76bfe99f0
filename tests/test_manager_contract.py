"""The contract file, its documentation, and the one dict <-> DomainConfig mapping."""
import re
from importlib import resources

import pytest

from cim_provider import contract
from cim_provider.contract import (InvalidEntry, Member, compare_members, config_from_dbus,
                                   config_to_dbus, config_to_values, interface_members,
                                   members, values_to_dbus)
from cim_provider.contract.bus import LIBRARY, ServiceInterface, Variant, method, plain
from cim_provider.domain.records import Disk, DomainConfig, Nic
from cim_provider.manager.service import ManagerService
from cim_provider.manager.store import SqliteStore

pytestmark = pytest.mark.dbus

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"

CONFIGS = [
    DomainConfig(uuid=UUID, name="minimal"),
    DomainConfig(uuid=UUID, name="full", title="A title", type="KVM", os_type="hvm",
                 arch="x86_64", vcpus=4096, memory_kib=contract.MAX_MEMORY_KIB,
                 max_memory_kib=contract.MAX_MEMORY_KIB, autostart=False,
                 disks=(Disk("vda", "/var/lib/x.img", "disk", "virtio", 2 ** 40),
                        Disk("hdc", None, "cdrom", "ide")),
                 nics=(Nic("52:54:00:12:34:56", "network", "default", "virtio"),
                       Nic("52:54:00:12:34:57"))),
]


def test_contract_declares_required_and_optional_members():
    m = members()
    assert m["ListInactiveDomains"] == Member("method", "ListInactiveDomains", "", "aa{sv}")
    assert m["StartDomain"] == Member("method", "StartDomain", "s", "s")
    assert m["ListDomains"].out_signature == "aa{sv}"
    assert m["DefineDomain"] == Member("method", "DefineDomain", "a{sv}", "s")
    assert m["UndefineDomain"] == Member("method", "UndefineDomain", "s", "")
    assert m["GetDomain"] == Member("method", "GetDomain", "s", "a{sv}")
    assert m["UpdateDomain"] == Member("method", "UpdateDomain", "sa{sv}", "")
    for s in ("DomainDefined", "DomainUndefined", "DomainChanged"):
        assert m[s] == Member("signal", s, "", "s")
    assert m["Generation"] == Member("property", "Generation", "", "t", "read")
    assert m["ListDomainsPage"] == Member("method", "ListDomainsPage", "su", "aa{sv}s")
    assert m["ListChangesSince"] == Member("method", "ListChangesSince", "t", "taa{sv}as")
    assert m["ListTemplates"] == Member("method", "ListTemplates", "", "aa{sv}")
    assert m["DefineFromTemplate"] == Member("method", "DefineFromTemplate", "sa{sv}", "s")
    assert m["TemplatesChanged"] == Member("signal", "TemplatesChanged", "", "")
    assert m["DomainsDisplaced"] == Member("signal", "DomainsDisplaced", "", "saa{sv}")
    assert set(m) == {"ListInactiveDomains", "StartDomain", "ListDomains", "DefineDomain",
                      "UndefineDomain", "GetDomain", "UpdateDomain", "DomainDefined",
                      "DomainUndefined", "DomainChanged", "Generation", "ListDomainsPage",
                      "ListChangesSince", "ListTemplates", "DefineFromTemplate",
                      "TemplatesChanged", "DomainsDisplaced"}


def test_reference_service_exports_exactly_the_contract(tmp_path):
    service = ManagerService([SqliteStore(tmp_path / "m.db")])
    assert compare_members(interface_members(service.introspect())) == []
    service.verify_contract()


class _Drifted(ServiceInterface):
    """A service whose StartDomain drifted from the contract."""
    def __init__(self):
        super().__init__(contract.INTERFACE)

    @method()
    def ListInactiveDomains(self) -> "aa{sv}":
        return []

    @method()
    def StartDomain(self, uuid: "s", force: "b") -> "s":
        return uuid


def test_drift_from_the_contract_is_reported():
    problems = compare_members(interface_members(_Drifted().introspect()))
    assert any("StartDomain" in p for p in problems)
    assert any("ListDomains is missing" in p for p in problems)


def test_documentation_names_every_member_key_and_error():
    doc = resources.files("cim_provider.contract").joinpath("MANAGER.md").read_text()
    for name in members():
        assert f"`{name}" in doc, name
    for key in list(contract.DOMAIN_KEYS) + list(contract.DISK_KEYS) + list(contract.NIC_KEYS):
        assert re.search(rf"`{key}`", doc), key
    for err in contract.ERRORS:
        assert f"`{err}`" in doc, err


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_round_trip(cfg):
    d = config_to_dbus(cfg)
    assert all(isinstance(v, Variant) for v in d.values())
    assert config_from_dbus(d) == cfg


def test_active_key_and_unknown_keys_do_not_change_the_config():
    d = config_to_dbus(CONFIGS[1], active=True)
    d["X-Vendor-Thing"] = Variant("as", ["a", "b"])
    assert d["Active"].value is True
    assert config_from_dbus(d) == CONFIGS[1]


def test_uuid_is_canonicalised_and_strings_are_tidied():
    d = values_to_dbus({"UUID": "{" + UUID.upper() + "}", "Name": "  spaced  ", "Title": ""})
    cfg = config_from_dbus(d)
    assert cfg.uuid == UUID and cfg.name == "spaced" and cfg.title is None


def test_config_to_values_is_plain_python():
    values = config_to_values(CONFIGS[1])
    assert values["Disks"][0] == {"Target": "vda", "Source": "/var/lib/x.img",
                                  "Device": "disk", "Bus": "virtio", "CapacityBytes": 2 ** 40}
    assert plain(config_to_dbus(CONFIGS[1])) == values


def test_values_to_dbus_types_by_contract_and_refuses_untyped_unknown_keys():
    d = values_to_dbus({"UUID": UUID, "Name": "n", "VCPUs": 2, "MemoryKiB": 1024,
                        "Autostart": True, "NICs": [{"MAC": "52:54:00:00:00:01"}]})
    assert {k: v.signature for k, v in d.items()} == {
        "UUID": "s", "Name": "s", "VCPUs": "u", "MemoryKiB": "t", "Autostart": "b",
        "NICs": "aa{sv}"}
    with pytest.raises(InvalidEntry, match="unknown key"):
        values_to_dbus({"Colour": "blue"})
    assert values_to_dbus({"Colour": Variant("s", "blue")})["Colour"].value == "blue"


@pytest.mark.parametrize("entry, reason", [
    ("not a dict", "not a dict"),
    ({"Name": Variant("s", "x")}, "UUID is missing"),
    ({"UUID": Variant("s", UUID)}, "Name"),
    ({"UUID": Variant("s", UUID), "Name": "plain str"}, "not a variant"),
    ({"UUID": Variant("s", UUID), "Name": Variant("s", "x"), "VCPUs": Variant("i", 2)},
     "D-Bus type 'i'"),
    ({"UUID": Variant("s", UUID), "Name": Variant("s", "x"), "VCPUs": Variant("u", 0)},
     "between 1"),
    ({"UUID": Variant("s", UUID), "Name": Variant("s", "x"),
      "MemoryKiB": Variant("t", contract.MAX_MEMORY_KIB + 1)}, "16 EiB"),
    ({"UUID": Variant("s", UUID), "Name": Variant("s", "x" * 4097)}, "4096"),
    ({"UUID": Variant("s", UUID), "Name": Variant("s", "x"),
      "Disks": Variant("aa{sv}", [{"Target": Variant("s", "vda")}] * 2)}, "same Target"),
    ({"UUID": Variant("s", UUID), "Name": Variant("s", "x"),
      "NICs": Variant("aa{sv}", [{"MAC": Variant("s", "nope")}])}, "not a MAC"),
])
def test_invalid_entries_raise_with_a_reason(entry, reason):
    with pytest.raises(InvalidEntry, match=re.escape(reason)):
        config_from_dbus(entry)
    assert issubclass(InvalidEntry, ValueError)


def test_library_choice_is_reported():
    assert LIBRARY in ("dbus_fast", "dbus_next")


def test_definitions_share_their_common_words_and_sizes():
    """Issue 16, memory per domain: values most definitions share are one object each."""
    from cim_provider.contract import config_from_values, config_to_values
    from cim_provider.domain.records import Disk, DomainConfig, Nic
    made = []
    for i in range(2):
        cfg = DomainConfig(uuid=f"00000000-0000-4000-8000-00000000000{i}", name=f"g{i}",
                           type="".join(["k", "vm"]), os_type="".join(["h", "vm"]),
                           arch="".join(["x86", "_64"]), memory_kib=int("1048576"),
                           max_memory_kib=int("2097152"),
                           disks=(Disk(target="".join(["v", "da"]), bus="".join(["vir", "tio"]),
                                       source=f"/img/{i}.qcow2", format="".join(["qc", "ow2"]),
                                       capacity_bytes=int("10737418240")),),
                           nics=(Nic(mac=f"52:54:00:00:00:0{i}", type="".join(["net", "work"]),
                                     source="".join(["def", "ault"]),
                                     model="".join(["vir", "tio"])),))
        made.append(config_from_values(config_to_values(cfg)))
    a, b = made
    assert a == DomainConfig(**{**{f: getattr(a, f) for f in a.__slots__}})
    for get in (lambda c: c.type, lambda c: c.os_type, lambda c: c.arch,
                lambda c: c.memory_kib, lambda c: c.max_memory_kib,
                lambda c: c.disks[0].target, lambda c: c.disks[0].bus,
                lambda c: c.disks[0].format, lambda c: c.disks[0].capacity_bytes,
                lambda c: c.nics[0].type, lambda c: c.nics[0].source, lambda c: c.nics[0].model):
        assert get(a) == get(b) and get(a) is get(b)
    assert a.disks[0].source != b.disks[0].source        # what differs stays as it is
