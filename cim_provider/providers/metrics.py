"""Usage metrics of running systems (DSP1053 Base Metrics).

The libvirt source samples every running domain once per `--metrics-interval` (in its
call threads, a slice of domains per call; the first sample one interval after the
connect) and hands the sample to inventory.resources, packed as numbers
(sources/libvirt_stats.py); nothing here asks libvirt. A sample costs nothing here: its
figures stay the numbers of the sample (inventory.resources keeps the last two), and a
system's values are built from them when a request reads them, kept until the next
sample (docs/architecture.md, "CIM model": "from the last two samples"). Building
every value of a sample up front made 60,000 instances per interval at 10,000 domains:
seconds of a thread holding the GIL beside the loop, and megabytes kept that nobody
might read. An enumeration of every value builds them in batches, yielding to the
loop between batches.

- VIRT_BaseMetricDefinition (key Id = VIRT:metric:<name>): cpu (percent of the
  domain's vCPUs over the last interval), memory (KiB in use, from the balloon),
  disk-read / disk-write / net-rx / net-tx (bytes moved during the last interval).
  Present while sampling is on.
- VIRT_BaseMetricValue (key InstanceID = VIRT:metric:<uuid>:<name>) per running system
  and metric, with TimeStamp (the sample) and Duration (the interval).
- VIRT_MetricDefForME (system -> definition), VIRT_MetricInstance (definition -> value),
  VIRT_MetricForME (system -> value).
"""
from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Iterable
from typing import Any

import pywbem
from pywbem import CIMClass, CIMDateTime, CIMError, CIMInstance, CIMInstanceName

from ..domain.records import DomainRecord
from ..domain.records import StatsSample
from ..inventory.resources import HostResources, Usage, usage_between
from ..wbem.provider import AssociationProvider, Provider, build_instance, path_key
from .backend import CS_CLASS, VIRT_NS, Backend, make
from .computer_system import system_path

log = logging.getLogger(__name__)

DEF_CLASS, VALUE_CLASS = "VIRT_BaseMetricDefinition", "VIRT_BaseMetricValue"
DEF_ME, INSTANCE, FOR_ME = "VIRT_MetricDefForME", "VIRT_MetricInstance", "VIRT_MetricForME"
PREFIX = "VIRT:metric:"
# DataType, ChangeType, TimeScope, GatheringType, Calculable values (CIM_BaseMetricDefinition)
REAL64, UINT64 = 5, 13
GAUGE = 4
POINT, INTERVAL = 2, 3
PERIODIC = 3
SUMMABLE, NON_SUMMABLE = 2, 3

# name -> (Name, DataType, Units, ProgrammaticUnits, TimeScope, Calculable, Usage field)
METRICS: dict[str, tuple[str, int, str, str, int, int, str]] = {
    "cpu": ("CPU utilisation", REAL64, "Percent", "percent", INTERVAL, NON_SUMMABLE,
            "cpu_percent"),
    "memory": ("Memory in use", UINT64, "KibiBytes", "byte*2^10", POINT, SUMMABLE,
               "memory_kib"),
    "disk-read": ("Disk bytes read", UINT64, "Bytes", "byte", INTERVAL, SUMMABLE,
                  "disk_read_bytes"),
    "disk-write": ("Disk bytes written", UINT64, "Bytes", "byte", INTERVAL, SUMMABLE,
                   "disk_write_bytes"),
    "net-rx": ("Network bytes received", UINT64, "Bytes", "byte", INTERVAL, SUMMABLE,
               "net_rx_bytes"),
    "net-tx": ("Network bytes sent", UINT64, "Bytes", "byte", INTERVAL, SUMMABLE,
               "net_tx_bytes"),
}


def def_path(name: str) -> CIMInstanceName:
    return CIMInstanceName(DEF_CLASS, {"Id": PREFIX + name}, namespace=VIRT_NS)


def value_path(uuid: str, name: str) -> CIMInstanceName:
    return CIMInstanceName(VALUE_CLASS, {"InstanceID": f"{PREFIX}{uuid}:{name}"},
                           namespace=VIRT_NS)


def split_value_iid(iid: object) -> tuple[str, str] | None:
    """VIRT:metric:<uuid>:<name> -> (uuid, name)."""
    if not isinstance(iid, str) or not iid.startswith(PREFIX):
        return None
    uuid, _, name = iid[len(PREFIX):].partition(":")
    return (uuid, name) if name in METRICS else None


def _text(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


class ValueBuilder:
    """Builds the VIRT_BaseMetricValue instances of one sample (wbem.provider's
    build_instance: values typed lazily from the class). The datetimes are made once
    per sample and shared: every value of a sample has the same TimeStamp."""

    def __init__(self, cls: CIMClass) -> None:
        self.cls = cls
        self._times: dict[tuple[str, float], CIMDateTime] = {}

    def _time(self, kind: str, seconds: float) -> CIMDateTime:
        key = (kind, seconds)
        value = self._times.get(key)
        if value is None:
            value = self._times[key] = CIMDateTime(
                datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
                if kind == "stamp" else datetime.timedelta(seconds=round(seconds, 6)))
        return value

    def values(self, rec: DomainRecord, usage: Usage) -> list[CIMInstance]:
        """The values of one system: one per metric its usage has a figure for."""
        stamp, duration = self._time("stamp", usage.time), self._time("for", usage.duration or 0.0)
        out: list[CIMInstance] = []
        for name, (title, *_rest, field) in METRICS.items():
            value = getattr(usage, field)
            if value is None:
                continue
            iid = f"{PREFIX}{rec.uuid}:{name}"
            out.append(build_instance(self.cls, {
                "InstanceID": iid, "MetricDefinitionId": PREFIX + name,
                "MeasuredElementName": rec.name, "ElementName": f"{title} of {rec.name}",
                "TimeStamp": stamp, "Duration": duration, "MetricValue": _text(value),
                "Volatile": True}, CIMInstanceName(VALUE_CLASS, {"InstanceID": iid},
                                                   namespace=VIRT_NS)))
        return out


def system_values(builder: ValueBuilder, rec: DomainRecord, sample: StatsSample | None,
                  previous: StatsSample | None) -> list[CIMInstance]:
    """One system's values from two samples (pure: immutable record and samples); none
    for a system not running or not in the newer sample."""
    stats = sample.stats.get(rec.uuid) if sample is not None and rec.running is not None \
        else None
    if sample is None or stats is None:
        return []
    old = previous.stats.get(rec.uuid) if previous is not None else None
    return builder.values(rec, usage_between(old, stats, previous.monotonic if previous
                                             else None, sample.monotonic, sample.time))


class _PerSample:
    """What was built from the current sample, by key; emptied when a new sample
    arrives (noticed by the sample count), so values nobody reads again are not kept
    past their interval."""

    __slots__ = ("samples", "data")

    def __init__(self) -> None:
        self.samples = -1
        self.data: dict[Any, tuple[int, Any]] = {}

    def get(self, samples: int, key: Any, version: int, build: Any) -> Any:
        if samples != self.samples:
            self.samples, self.data = samples, {}
        hit = self.data.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = build()
        self.data[key] = (version, value)
        return value


# Systems whose values an enumeration builds between two yields to the loop (~6 ms).
BATCH = 200


class MetricsProvider(Provider):
    """Definitions and values."""
    namespace = VIRT_NS
    classnames = (DEF_CLASS, VALUE_CLASS)

    def __init__(self, backend: Backend):
        self.b = backend
        self.res: HostResources = backend.inventory.resources
        # Built on request from the current sample: per system, and its builder (the
        # sample's datetimes, shared by its values).
        self._values = _PerSample()
        self._builder: tuple[int, ValueBuilder] | None = None
        # The last enumeration of values: (records tuple, sample, values). The same
        # tuple while neither changed, so the dispatcher reuses its rendering; dropped
        # with its sample.
        self._all: tuple[Any, Any, tuple[CIMInstance, ...]] | None = None
        self.res.subscribe(self._on_resources)
        self._defs = [make(backend, DEF_CLASS, {
            "Id": PREFIX + name, "Name": title, "ElementName": title, "DataType": dtype,
            "Units": units, "ProgrammaticUnits": punits, "TimeScope": scope,
            "Calculable": calc, "ChangeType": GAUGE, "GatheringType": PERIODIC,
            "IsContinuous": True}, def_path(name))
            for name, (title, dtype, units, punits, scope, calc, _f) in METRICS.items()]

    @property
    def on(self) -> bool:
        return self.res.sampling > 0

    def definitions(self) -> list[CIMInstance]:
        return list(self._defs) if self.on else []

    def _on_resources(self, kind: str, _name: str) -> None:
        """A new sample: what was built from the one before goes (O(1) here)."""
        if kind == "sample":
            self._all = None
            self._builder = None
            self._values = _PerSample()

    async def close(self) -> None:
        """Nothing runs in the background."""

    def builder(self) -> ValueBuilder:
        """The current sample's builder."""
        samples = self.res.samples
        current = self._builder
        if current is None or current[0] != samples:
            current = self._builder = (samples, ValueBuilder(self.b.cls(VALUE_CLASS)))
        return current[1]

    def values_of(self, rec: DomainRecord) -> list[CIMInstance]:
        """The metric values of one system for the current sample, built once per
        sample and record version."""
        if rec.running is None or self.res.sample is None:
            return []
        return self._values.get(self.res.samples, rec.uuid, rec.version, lambda: system_values(
            self.builder(), rec, self.res.sample, self.res.previous))

    def measured(self) -> Iterable[DomainRecord]:
        """The records the last sample has figures for."""
        sample = self.res.sample
        if sample is None:
            return []
        return [r for r in self.b.inventory.records()
                if r.running is not None and r.uuid in sample.stats]

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        if classname.lower() == DEF_CLASS.lower():
            return self.definitions()
        records, sample, previous = self.b.inventory.records(), self.res.sample, \
            self.res.previous
        last = self._all
        if last is not None and last[0] is records and last[1] is sample:
            return last[2]
        # One sample's values throughout, though the loop may take a newer one while
        # this yields: built from the samples and records as they were at the call.
        builder = ValueBuilder(self.b.cls(VALUE_CLASS))
        out: list[CIMInstance] = []
        measured = self.measured()
        for i, rec in enumerate(measured):
            if i and not i % BATCH:
                await asyncio.sleep(0)
            out += system_values(builder, rec, sample, previous)
        values = tuple(out)
        if self.res.sample is sample and self.b.inventory.records() is records:
            self._all = (records, sample, values)
        return values

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        if path.classname.lower() == DEF_CLASS.lower():
            return await super().get_instance(path)
        parts = split_value_iid(path.keybindings.get("InstanceID"))
        rec = self.b.inventory.get(parts[0]) if parts else None
        if rec is not None:
            for v in self.values_of(rec):
                if v["InstanceID"] == path.keybindings["InstanceID"]:
                    return v
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                       f"no metric value {path.keybindings.get('InstanceID')!r}")


class MetricAssociationsProvider(AssociationProvider):
    """MetricDefForME, MetricInstance, MetricForME."""
    namespace = VIRT_NS
    classnames = (DEF_ME, INSTANCE, FOR_ME)

    def __init__(self, backend: Backend, metrics: MetricsProvider):
        self.b = backend
        self.m = metrics
        self._cache = _PerSample()          # emptied by the next sample, as the values

    def _assoc(self, cls: str, a: CIMInstanceName, d: CIMInstanceName,
               extra: dict[str, Any] | None = None) -> CIMInstance:
        keys = {"Antecedent": a, "Dependent": d}
        return make(self.b, cls, {**keys, **(extra or {})},
                    CIMInstanceName(cls, keys, namespace=VIRT_NS))

    def of_record(self, rec: DomainRecord, cls: str) -> list[CIMInstance]:
        def build() -> list[CIMInstance]:
            values = self.m.values_of(rec)
            sp = system_path(rec.uuid)
            if cls == DEF_ME:
                return [self._assoc(DEF_ME, sp, d.path, {"MetricCollectionEnabled": 2})
                        for d in self.m.definitions()] if values else []
            if cls == FOR_ME:
                return [self._assoc(FOR_ME, sp, v.path) for v in values]
            return [self._assoc(INSTANCE, def_path(v["MetricDefinitionId"][len(PREFIX):]),
                                v.path) for v in values]
        return self._cache.get(self.m.res.samples, (rec.uuid, cls), rec.version, build)

    def _canon(self, classname: str) -> str:
        return next(c for c in self.classnames if c.lower() == classname.lower())

    async def _every(self, cls: str, key: tuple | None = None) -> list[CIMInstance]:
        """`cls` of every measured system (referring to `key`), built in batches with a
        yield to the loop between them; all from one sample (again when a new sample
        arrived meanwhile, up to three times; samples that keep arriving faster than a
        walk leave the last walk, which may straddle two of them)."""
        for _ in range(3):
            samples = self.m.res.samples
            out: list[CIMInstance] = []
            for i, rec in enumerate(self.m.measured()):
                if i and not i % BATCH:
                    await asyncio.sleep(0)
                out += [a for a in self.of_record(rec, cls) if key is None or _names(a, key)]
            if self.m.res.samples == samples:
                break
        return out

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return await self._every(self._canon(classname))

    async def references(self, classname: str, source: CIMInstanceName) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        key = path_key(source, VIRT_NS)
        scls = source.classname.lower()
        if scls not in (CS_CLASS.lower(), VALUE_CLASS.lower(), DEF_CLASS.lower()):
            return []
        rec = None
        if scls == CS_CLASS.lower():
            try:
                rec = self.b.record_for(source)
            except CIMError:
                return []
        elif scls == VALUE_CLASS.lower():
            parts = split_value_iid(source.keybindings.get("InstanceID"))
            rec = self.b.inventory.get(parts[0]) if parts else None
        elif scls == DEF_CLASS.lower() and cls != FOR_ME:     # every measured system (O(N))
            return await self._every(cls, key)
        if rec is None:
            return []
        return [a for a in self.of_record(rec, cls) if _names(a, key)]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        dep = path.keybindings.get("Dependent")
        ant = path.keybindings.get("Antecedent")
        source = dep if path.classname.lower() != DEF_ME.lower() else ant
        if isinstance(source, CIMInstanceName):
            for inst in await self.references(path.classname, source):
                if path_key(inst.path) == path_key(path, VIRT_NS):
                    return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no {path.classname} with those references")


def _names(assoc: CIMInstance, key: tuple) -> bool:
    return any(p.type == "reference" and p.value is not None and path_key(p.value) == key
               for p in assoc.properties.values())
