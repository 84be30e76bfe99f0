"""Usage metrics of running systems (DSP1053 Base Metrics).

The libvirt source samples every running domain once per `--metrics-interval` with
one getAllDomainStats call (in its call threads) and hands the sample to
inventory.resources; nothing here asks libvirt. The values of a sample are built in a
worker thread as soon as it arrives (so 10,000 domains cost the loop nothing; a read
right after a sample waits for it without blocking the loop); a value read while no
build is under way for the current sample is built on the spot.

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
from collections.abc import Iterable, Sequence
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


def build_values(cls: CIMClass, records: Sequence[DomainRecord], sample: StatsSample,
                 previous: StatsSample | None) -> dict[str, tuple[int, list[CIMInstance]]]:
    """Every running system's values of one sample: uuid -> (record version, values).
    Pure (reads immutable records and samples only): runs in a worker thread."""
    builder = ValueBuilder(cls)
    out = {}
    for rec in records:
        stats = sample.stats.get(rec.uuid) if rec.running is not None else None
        if stats is None:
            continue
        old = previous.stats.get(rec.uuid) if previous is not None else None
        usage = usage_between(old, stats, previous.monotonic if previous else None,
                              sample.monotonic, sample.time)
        out[rec.uuid] = (rec.version, builder.values(rec, usage))
    return out


class MetricsProvider(Provider):
    """Definitions and values."""
    namespace = VIRT_NS
    classnames = (DEF_CLASS, VALUE_CLASS)

    def __init__(self, backend: Backend):
        self.b = backend
        self.res: HostResources = backend.inventory.resources
        self._cache = backend.new_cache()
        # The values of the current sample, built in a worker thread: (sample, values)
        self._built: tuple[StatsSample, dict[str, tuple[int, list[CIMInstance]]]] | None = None
        self._builder: ValueBuilder | None = None           # for values built on the spot
        self._builds: set[asyncio.Future[Any]] = set()
        self._pending: tuple[StatsSample, asyncio.Future[Any]] | None = None
        # The last enumeration of values: (records tuple, sample, values). The same
        # tuple while neither changed, so the dispatcher reuses its rendering.
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
        """A new sample: build its values in a worker thread, off the loop."""
        if kind != "sample" or self.res.sample is None:
            return
        self._builder = None
        sample, previous = self.res.sample, self.res.previous
        records = self.b.inventory.records()         # an immutable tuple
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        fut = loop.run_in_executor(None, build_values, self.b.cls(VALUE_CLASS), records,
                                   sample, previous)
        self._builds.add(fut)
        self._pending = (sample, fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._builds.discard(f)
            if f.cancelled() or f.exception() is not None:
                if not f.cancelled():
                    log.error("building metric values failed: %s", f.exception())
                return
            if self.res.sample is sample:             # not overtaken by a newer sample
                self._built = (sample, f.result())
        fut.add_done_callback(done)

    async def ready(self) -> None:
        """Wait (without blocking the loop) for the build of the current sample's values
        when one is under way: a read right after a sample uses it, not a second build."""
        pending = self._pending
        if pending is not None and pending[0] is self.res.sample and not pending[1].done():
            await asyncio.gather(asyncio.shield(pending[1]), return_exceptions=True)

    async def close(self) -> None:
        for fut in list(self._builds):
            await asyncio.gather(fut, return_exceptions=True)

    def values_of(self, rec: DomainRecord) -> list[CIMInstance]:
        """The metric values of one system for the current sample: the worker thread's,
        else built here (once per sample and record version)."""
        built = self._built
        if built is not None and built[0] is self.res.sample:
            hit = built[1].get(rec.uuid)
            if hit is not None and hit[0] == rec.version:
                return hit[1]

        def build() -> list[CIMInstance]:
            usage = self.res.usage(rec.uuid) if rec.running is not None else None
            if usage is None:
                return []
            if self._builder is None:
                self._builder = ValueBuilder(self.b.cls(VALUE_CLASS))
            return self._builder.values(rec, usage)
        return self._cache.get((rec.uuid, "metrics"), (self.res.samples, rec.version), build)

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
        await self.ready()
        records, sample = self.b.inventory.records(), self.res.sample
        last = self._all
        if last is not None and last[0] is records and last[1] is sample:
            return last[2]
        out = tuple(v for rec in self.measured() for v in self.values_of(rec))
        self._all = (records, sample, out)
        return out

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        if path.classname.lower() == DEF_CLASS.lower():
            return await super().get_instance(path)
        parts = split_value_iid(path.keybindings.get("InstanceID"))
        rec = self.b.inventory.get(parts[0]) if parts else None
        if rec is not None:
            await self.ready()
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
        self._cache = backend.new_cache()

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
        return self._cache.get((rec.uuid, cls), (self.m.res.samples, rec.version), build)

    def _canon(self, classname: str) -> str:
        return next(c for c in self.classnames if c.lower() == classname.lower())

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        await self.m.ready()
        return [a for rec in self.m.measured() for a in self.of_record(rec, cls)]

    async def references(self, classname: str, source: CIMInstanceName) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        key = path_key(source, VIRT_NS)
        scls = source.classname.lower()
        if scls not in (CS_CLASS.lower(), VALUE_CLASS.lower(), DEF_CLASS.lower()):
            return []
        await self.m.ready()
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
            return [a for r in self.m.measured() for a in self.of_record(r, cls)
                    if _names(a, key)]
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
