"""The org.example.virt.Manager contract: its introspection XML, names, and the mapping.

The XML beside this file is the single contract; the client and the reference service
both load it from here. This module is also the ONE place that maps between the
contract's dicts (`a{sv}`) and `DomainConfig`. Data from a Manager is untrusted input:
`config_from_dbus` checks every type and size and raises `InvalidEntry` (a ValueError)
with a human reason instead of letting odd data reach the inventory.
"""
from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..domain.domxml import nic_kind
from ..domain.records import Disk, DomainConfig, Nic
from ..domain.records import canonical_uuid, shared_number, shared_word
from .bus import Variant, intr

log = logging.getLogger(__name__)

BUS_NAME = "org.example.virt"
OBJECT_PATH = "/org/example/virt/Manager"
INTERFACE = "org.example.virt.Manager"
CONTRACT_FILE = "org.example.virt.Manager.xml"

ERROR_PREFIX = "org.example.virt.Error."
ERROR_NOT_FOUND = ERROR_PREFIX + "NotFound"
ERROR_ALREADY_RUNNING = ERROR_PREFIX + "AlreadyRunning"
ERROR_REFUSED = ERROR_PREFIX + "Refused"
ERROR_INVALID_ARGUMENT = ERROR_PREFIX + "InvalidArgument"
ERROR_NOT_SUPPORTED = ERROR_PREFIX + "NotSupported"
ERROR_FAILED = ERROR_PREFIX + "Failed"
# ListChangesSince: the Manager cannot say what changed since that generation (too old,
# from another history, or too much changed); the client lists everything again.
ERROR_GENERATION_UNKNOWN = ERROR_PREFIX + "GenerationUnknown"
ERRORS = (ERROR_NOT_FOUND, ERROR_ALREADY_RUNNING, ERROR_REFUSED, ERROR_INVALID_ARGUMENT,
          ERROR_NOT_SUPPORTED, ERROR_FAILED, ERROR_GENERATION_UNKNOWN)

REQUIRED_METHODS = frozenset({"ListInactiveDomains", "StartDomain"})
CHANGE_SIGNALS = frozenset({"DomainDefined", "DomainUndefined", "DomainChanged"})
# Templates (optional): ListTemplates, DefineFromTemplate, and the signal that the
# templates changed; DomainsDisplaced: what a start displaced to make room.
TEMPLATE_METHODS = frozenset({"ListTemplates", "DefineFromTemplate"})
TEMPLATES_CHANGED = "TemplatesChanged"
DOMAINS_DISPLACED = "DomainsDisplaced"
# The paged and incremental listings (optional; a Manager with many definitions needs
# them: one D-Bus message is capped at 32 MiB by default, about 80,000 definitions).
PAGED_METHODS = frozenset({"ListDomainsPage", "ListChangesSince"})
# Most entries a ListDomainsPage answer may carry, whatever the client asks for; a
# ListChangesSince answer with more changes than this is Error.GenerationUnknown.
MAX_PAGE = 10_000

# Limits past which a value is "absurd" rather than merely large.
MAX_VCPUS = 4096
MAX_MEMORY_KIB = 16 * 2 ** 60 // 1024      # 16 EiB
MAX_CAPACITY_BYTES = 16 * 2 ** 60          # 16 EiB
MAX_STRING = 4096
MAX_DEVICES = 256
MAX_VARIABLES = 256                        # template variables of one definition
PRIORITY_RANGE = (-2 ** 31, 2 ** 31 - 1)   # D-Bus 'i'

# The D-Bus type of every key the contract defines (unknown keys are ignored).
DOMAIN_KEYS: dict[str, str] = {
    "UUID": "s", "Name": "s", "Title": "s", "Type": "s", "OSType": "s", "Arch": "s",
    "VCPUs": "u", "MemoryKiB": "t", "MaxMemoryKiB": "t", "Autostart": "b",
    "Disks": "aa{sv}", "NICs": "aa{sv}", "Active": "b", "Host": "s",
    "Priority": "i", "MinMemoryKiB": "t", "Template": "s", "TemplateVariables": "a{sv}",
}
DISK_KEYS: dict[str, str] = {"Target": "s", "Source": "s", "Device": "s", "Bus": "s",
                             "CapacityBytes": "t", "Format": "s", "Type": "s"}
# A disk's Type: what its Source names (a volume's Source is `pool/volume`).
DISK_TYPES = ("file", "block", "volume")
_FORMAT = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,31}$")
NIC_KEYS: dict[str, str] = {"MAC": "s", "Type": "s", "Source": "s", "Model": "s"}
# ListTemplates: one dict per template, its Variables one dict each. A variable's
# Default has the variable's own type (s, x or b) and is absent when it is required.
TEMPLATE_KEYS: dict[str, str] = {"Name": "s", "Description": "s", "Variables": "aa{sv}",
                                 "Version": "s"}
VARIABLE_KEYS: dict[str, str] = {"Name": "s", "Type": "s", "Description": "s"}
VARIABLE_TYPES = ("string", "int", "bool")
# DomainsDisplaced: one dict per action a start took to make room (Action: shrunk,
# paused, saved; MemoryKiB: what a displaced domain held, or what a shrunk one got).
ACTION_KEYS: dict[str, str] = {"UUID": "s", "Name": "s", "Action": "s", "MemoryKiB": "t",
                               "Priority": "i", "RequestedMemoryKiB": "t"}

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class InvalidEntry(ValueError):
    """A dict from (or for) a Manager that does not satisfy the contract."""


# ---------------------------------------------------------------- the XML contract

@dataclass(frozen=True, slots=True)
class Member:
    """One member of the interface as the contract declares it."""
    kind: str            # "method" | "signal" | "property"
    name: str
    in_signature: str = ""
    out_signature: str = ""   # a signal's or a property's type goes here
    access: str = ""          # properties only: read | write | readwrite


@functools.cache
def contract_xml() -> str:
    """The introspection XML, read from the package (works from a wheel or a zip too)."""
    return resources.files(__package__).joinpath(CONTRACT_FILE).read_text(encoding="utf-8")


def contract_interface() -> intr.Interface:
    """The contract's interface, parsed by the D-Bus library in use."""
    node = intr.Node.parse(contract_xml())
    for iface in node.interfaces:
        if iface.name == INTERFACE:
            return iface
    raise RuntimeError(f"{CONTRACT_FILE} does not declare {INTERFACE}")


def interface_members(iface: intr.Interface) -> dict[str, Member]:
    """Members of a parsed interface, in a library-neutral form for comparisons."""
    out: dict[str, Member] = {}
    for m in iface.methods:
        out[m.name] = Member("method", m.name, m.in_signature, m.out_signature)
    for s in iface.signals:
        out[s.name] = Member("signal", s.name, "", s.signature)
    for p in iface.properties:
        access = getattr(p.access, "value", p.access)
        out[p.name] = Member("property", p.name, "", p.signature, str(access))
    return out


@functools.cache
def members() -> Mapping[str, Member]:
    """Every member of the contract by name."""
    return interface_members(contract_interface())


def compare_members(offered: Mapping[str, Member]) -> list[str]:
    """Differences between `offered` and the contract, as sentences (empty: identical)."""
    problems = []
    contract = members()
    for name, m in contract.items():
        got = offered.get(name)
        if got is None:
            problems.append(f"{m.kind} {name} is missing")
        elif got != m:
            problems.append(f"{m.kind} {name} is declared as {got}, the contract says {m}")
    for name in offered.keys() - contract.keys():
        problems.append(f"{offered[name].kind} {name} is not in the contract")
    return problems


# ---------------------------------------------------------------- dicts <-> DomainConfig

_PLAIN_LIMITS = {"u": 2 ** 32, "t": 2 ** 64, "i": 2 ** 31}


def _value(d: Mapping[str, Any], key: str, sig: str, where: str, plain: bool = False) -> Any:
    """The plain value of d[key] if present with the declared type, else None.

    `plain`: the values are plain Python (JSON from a database), not Variants; the
    same rules apply, with the integer ranges a Variant of that type would enforce."""
    v = d.get(key)
    if v is None:
        return None
    if plain:
        value = v
        if isinstance(value, Variant):
            raise InvalidEntry(f"{where}{key} is a variant, expected a plain value")
        limit = _PLAIN_LIMITS.get(sig)
        if limit is not None and isinstance(value, int) and value >= limit:
            raise InvalidEntry(f"{where}{key} {value} does not fit D-Bus type '{sig}'")
    else:
        if not isinstance(v, Variant):
            raise InvalidEntry(f"{where}{key} is not a variant")
        if v.signature != sig:
            raise InvalidEntry(f"{where}{key} has D-Bus type '{v.signature}', expected '{sig}'")
        value = v.value
    if sig == "s":
        if not isinstance(value, str):
            raise InvalidEntry(f"{where}{key} is not a string")
        if len(value) > MAX_STRING:
            raise InvalidEntry(f"{where}{key} is longer than {MAX_STRING} characters")
        if "\0" in value:
            raise InvalidEntry(f"{where}{key} contains a NUL character")
    elif sig in ("u", "t"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidEntry(f"{where}{key} is not an integer")
        if value < 0:
            raise InvalidEntry(f"{where}{key} is negative")
    elif sig == "i":
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidEntry(f"{where}{key} is not an integer")
        if not PRIORITY_RANGE[0] <= value <= PRIORITY_RANGE[1]:
            raise InvalidEntry(f"{where}{key} {value} does not fit D-Bus type 'i'")
    elif sig == "a{sv}":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise InvalidEntry(f"{where}{key} is not a dict with string keys")
        if len(value) > MAX_VARIABLES:
            raise InvalidEntry(f"{where}{key} has {len(value)} entries (more than "
                               f"{MAX_VARIABLES})")
    elif sig == "b":
        if not isinstance(value, bool):
            # D-Bus booleans arrive as bool; an int here is a type confusion.
            raise InvalidEntry(f"{where}{key} is not a boolean")
    elif sig == "aa{sv}":
        if not isinstance(value, (list, tuple)):
            raise InvalidEntry(f"{where}{key} is not an array")
        if len(value) > MAX_DEVICES:
            raise InvalidEntry(f"{where}{key} has {len(value)} entries (more than {MAX_DEVICES})")
        for item in value:
            if not isinstance(item, Mapping):
                raise InvalidEntry(f"{where}{key} holds something that is not a dict")
    return value


def _opt_str(d: Mapping[str, Any], key: str, where: str = "", plain: bool = False) -> str | None:
    """Optional strings: an empty one means "not set"."""
    return _value(d, key, "s", where, plain) or None


def _disk(d: Mapping[str, Any], i: int, plain: bool = False) -> Disk:
    where = f"Disks[{i}]."
    target = (_value(d, "Target", "s", where, plain) or "").strip()
    if not target:
        raise InvalidEntry(f"{where}Target is missing or empty")
    capacity = _value(d, "CapacityBytes", "t", where, plain)
    if capacity is not None and capacity > MAX_CAPACITY_BYTES:
        raise InvalidEntry(f"{where}CapacityBytes {capacity} is more than 16 EiB")
    fmt = _opt_str(d, "Format", where, plain)
    if fmt is not None and not _FORMAT.match(fmt):
        raise InvalidEntry(f"{where}Format {fmt[:40]!r} is not an image format name")
    kind = _opt_str(d, "Type", where, plain)
    if kind is not None and kind not in DISK_TYPES:
        raise InvalidEntry(f"{where}Type {kind[:40]!r} is not one of {', '.join(DISK_TYPES)}")
    return Disk(target=sys.intern(target), source=_opt_str(d, "Source", where, plain),
                device=shared_word(_opt_str(d, "Device", where, plain)) or "disk",
                bus=shared_word(_opt_str(d, "Bus", where, plain)),
                capacity_bytes=shared_number(capacity),
                source_type=shared_word(kind), format=shared_word(fmt))


def _nic(d: Mapping[str, Any], i: int, plain: bool = False) -> Nic:
    where = f"NICs[{i}]."
    mac = (_value(d, "MAC", "s", where, plain) or "").strip().lower()
    if not _MAC.match(mac):
        raise InvalidEntry(f"{where}MAC {mac!r} is not a MAC address")
    kind = _opt_str(d, "Type", where, plain)
    source = _opt_str(d, "Source", where, plain)
    if source and kind != "user":
        # `bridge:br0` (a host bridge), `network:default`, `direct:eth0`; a bare
        # name is a libvirt network unless Type says otherwise
        kind, source = nic_kind(kind, source)
    return Nic(mac=mac, type=shared_word(kind), source=shared_word(source),
               model=shared_word(_opt_str(d, "Model", where, plain)))


def config_from_values(d: Any) -> DomainConfig:
    """Plain contract values (a JSON object from a database, as `config_to_values`
    writes them) as a DomainConfig, or InvalidEntry: the same rules as
    `config_from_dbus`, without building a Variant per value."""
    return config_from_dbus(d, plain=True)


def config_from_dbus(d: Any, plain: bool = False) -> DomainConfig:
    """A contract dict (`a{sv}`, values are Variants) as a DomainConfig, or InvalidEntry.

    Unknown keys (and `Active` and `Host`, which are not configuration) are ignored.
    `plain`: see `config_from_values`.
    """
    if not isinstance(d, Mapping):
        raise InvalidEntry("entry is not a dict")
    if not all(isinstance(k, str) for k in d):
        raise InvalidEntry("entry has a key that is not a string")
    raw_uuid = _value(d, "UUID", "s", "", plain)
    if raw_uuid is None:
        raise InvalidEntry("UUID is missing")
    uuid = canonical_uuid(raw_uuid)
    if uuid is None:
        raise InvalidEntry(f"UUID {raw_uuid[:80]!r} is not a UUID")
    name = (_value(d, "Name", "s", "", plain) or "").strip()
    if not name:
        raise InvalidEntry("Name is missing or empty")
    vcpus = _value(d, "VCPUs", "u", "", plain)
    if vcpus is not None and not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidEntry(f"VCPUs {vcpus} is not between 1 and {MAX_VCPUS}")
    memory = _value(d, "MemoryKiB", "t", "", plain)
    max_memory = _value(d, "MaxMemoryKiB", "t", "", plain)
    min_memory = _value(d, "MinMemoryKiB", "t", "", plain)
    for key, v in (("MemoryKiB", memory), ("MaxMemoryKiB", max_memory),
                   ("MinMemoryKiB", min_memory)):
        if v is not None and v > MAX_MEMORY_KIB:
            raise InvalidEntry(f"{key} {v} is more than 16 EiB")
    priority = _value(d, "Priority", "i", "", plain)
    # checked so a wrong type is reported, not used here
    _value(d, "Active", "b", "", plain)
    _value(d, "Host", "s", "", plain)
    _value(d, "Template", "s", "", plain)
    _value(d, "TemplateVariables", "a{sv}", "", plain)
    disks = tuple(_disk(x, i, plain)
                  for i, x in enumerate(_value(d, "Disks", "aa{sv}", "", plain) or ()))
    nics = tuple(_nic(x, i, plain)
                 for i, x in enumerate(_value(d, "NICs", "aa{sv}", "", plain) or ()))
    if len({x.target for x in disks}) != len(disks):
        raise InvalidEntry("two disks have the same Target")
    if len({x.mac for x in nics}) != len(nics):
        raise InvalidEntry("two NICs have the same MAC")
    # Words and sizes most definitions share are kept once (domain/records.py).
    return DomainConfig(
        uuid=uuid, name=name, title=_opt_str(d, "Title", "", plain),
        type=shared_word(_opt_str(d, "Type", "", plain)),
        os_type=shared_word(_opt_str(d, "OSType", "", plain)),
        arch=shared_word(_opt_str(d, "Arch", "", plain)), vcpus=vcpus,
        memory_kib=shared_number(memory), max_memory_kib=shared_number(max_memory),
        autostart=_value(d, "Autostart", "b", "", plain), disks=disks, nics=nics,
        priority=priority, min_memory_kib=shared_number(min_memory))


def active_from_dbus(d: Mapping[str, Any]) -> bool:
    """The `Active` key of a ListDomains entry (absent means not running)."""
    return bool(_value(d, "Active", "b", ""))


def host_from_dbus(d: Mapping[str, Any]) -> str | None:
    """The `Host` key of an entry (the farm host it is placed on), None when absent."""
    return _value(d, "Host", "s", "") or None


def config_to_values(cfg: DomainConfig) -> dict[str, Any]:
    """A DomainConfig as contract keys with plain Python values (None fields left out)."""
    out: dict[str, Any] = {"UUID": cfg.uuid, "Name": cfg.name}
    for key, v in (("Title", cfg.title), ("Type", cfg.type), ("OSType", cfg.os_type),
                   ("Arch", cfg.arch), ("VCPUs", cfg.vcpus), ("MemoryKiB", cfg.memory_kib),
                   ("MaxMemoryKiB", cfg.max_memory_kib), ("Autostart", cfg.autostart),
                   ("Priority", cfg.priority), ("MinMemoryKiB", cfg.min_memory_kib)):
        if v is not None:
            out[key] = v
    if cfg.disks:
        out["Disks"] = [
            {k: v for k, v in (("Target", x.target),
                               ("Source", f"{x.pool}/{x.source}" if x.pool and x.source
                                else x.source),
                               ("Device", x.device), ("Bus", x.bus),
                               ("CapacityBytes", x.capacity_bytes), ("Format", x.format),
                               ("Type", x.source_type if x.source_type in DISK_TYPES
                                else None))
             if v is not None}
            for x in cfg.disks]
    if cfg.nics:
        out["NICs"] = [
            {k: v for k, v in (("MAC", x.mac), ("Type", x.type), ("Source", x.source),
                               ("Model", x.model)) if v is not None}
            for x in cfg.nics]
    return out


def variant_of(value: Any, where: str = "value") -> Variant:
    """A plain value as a Variant of its natural type: str s, bool b, int x (a
    Variant passes through). Template variables travel this way."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        if not -2 ** 63 <= value < 2 ** 63:
            raise InvalidEntry(f"{where}: {value} does not fit D-Bus type 'x'")
        return Variant("x", value)
    if isinstance(value, str):
        return Variant("s", value)
    raise InvalidEntry(f"{where}: a {type(value).__name__} is not a string, integer or "
                       "boolean")


def _to_variant(key: str, value: Any, sig: str) -> Variant:
    if isinstance(value, Variant):
        return value
    if sig == "a{sv}":
        if not isinstance(value, Mapping):
            raise InvalidEntry(f"{key} must be a dict")
        value = {str(k): variant_of(v, f"{key}.{k}") for k, v in value.items()}
    if sig == "aa{sv}":
        inner = DISK_KEYS if key == "Disks" else NIC_KEYS
        if not isinstance(value, (list, tuple)):
            raise InvalidEntry(f"{key} must be a list of dicts")
        value = [values_to_dbus(item, inner) for item in value]
    try:
        return Variant(sig, value)
    except Exception as exc:  # each library has its own error types for this
        raise InvalidEntry(f"{key}: {value!r} is not a valid '{sig}' ({exc})") from None


def values_to_dbus(values: Mapping[str, Any],
                   keys: Mapping[str, str] = DOMAIN_KEYS) -> dict[str, Variant]:
    """Plain Python values -> `a{sv}`, using the types the contract declares per key.

    Values that already are Variants pass through; a key the contract does not know
    cannot be typed and is refused.
    """
    if not isinstance(values, Mapping):
        raise InvalidEntry("expected a dict")
    out: dict[str, Variant] = {}
    for key, value in values.items():
        sig = keys.get(key)
        if sig is None:
            if isinstance(value, Variant):
                out[key] = value
                continue
            raise InvalidEntry(f"unknown key {key!r}: pass a Variant to send it anyway")
        out[key] = _to_variant(key, value, sig)
    return out


def config_to_dbus(cfg: DomainConfig, active: bool | None = None,
                   host: str | None = None) -> dict[str, Variant]:
    """A DomainConfig as a contract dict; `active` adds the ListDomains key `Active`,
    `host` the key `Host` (the farm host the definition is placed on)."""
    values = config_to_values(cfg)
    if active is not None:
        values["Active"] = bool(active)
    if host:
        values["Host"] = host
    return values_to_dbus(values)


# ---------------------------------------------------------------- templates

def _plain_default(var: Mapping[str, Any], where: str) -> Any:
    v = var.get("Default")
    if v is None:
        return None
    if not isinstance(v, Variant) or v.signature not in ("s", "x", "b"):
        raise InvalidEntry(f"{where}Default is not a string, integer (x) or boolean")
    value = v.value
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise InvalidEntry(f"{where}Default is longer than {MAX_STRING} characters")
    return value


def templates_from_dbus(entries: Any) -> list[dict[str, Any]]:
    """ListTemplates' answer as plain dicts (Name, Description, Version, Variables:
    Name, Type, Default (absent: required), Description); a malformed template is
    left out with a warning, the others are kept."""
    if not isinstance(entries, (list, tuple)):
        raise InvalidEntry("ListTemplates did not return an array")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, t in enumerate(entries):
        try:
            if not isinstance(t, Mapping):
                raise InvalidEntry("not a dict")
            name = _value(t, "Name", "s", "")
            if not name:
                raise InvalidEntry("Name is missing or empty")
            variables = []
            for j, var in enumerate(_value(t, "Variables", "aa{sv}", "") or ()):
                where = f"Variables[{j}]."
                vname = _value(var, "Name", "s", where)
                vtype = _value(var, "Type", "s", where)
                if not vname or vtype not in VARIABLE_TYPES:
                    raise InvalidEntry(f"{where}Name or Type is missing or unknown")
                variables.append({"Name": vname, "Type": vtype,
                                  "Default": _plain_default(var, where),
                                  "Description": _value(var, "Description", "s", where) or ""})
            if name in seen:
                raise InvalidEntry(f"template {name!r} is listed twice")
            seen.add(name)
            out.append({"Name": name,
                        "Description": _value(t, "Description", "s", "") or "",
                        "Version": _value(t, "Version", "s", "") or "",
                        "Variables": variables})
        except InvalidEntry as exc:
            log.warning("skipping template #%d of ListTemplates: %s", i, exc)
    return out


def template_to_dbus(name: str, description: str, version: str,
                     variables: list[tuple[str, str, Any, str]]) -> dict[str, Variant]:
    """One ListTemplates entry; `variables`: (name, type, default or None, description)."""
    vs = []
    for vname, vtype, default, text in variables:
        d = {"Name": Variant("s", vname), "Type": Variant("s", vtype),
             "Description": Variant("s", text)}
        if default is not None:
            d["Default"] = variant_of(default, f"{name}.{vname}")
        vs.append(d)
    return {"Name": Variant("s", name), "Description": Variant("s", description),
            "Version": Variant("s", version), "Variables": Variant("aa{sv}", vs)}
