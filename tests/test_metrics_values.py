"""Metric values built on request from the numbers of the last two samples (issue 16):
a rendered VIRT_BaseMetricValue is exactly the instance the provider built before, value
for value and byte for byte; one sample's values are consistent whichever way they are
read (GetInstance, enumeration, associations); a new sample keeps nothing built from
the one before.
"""
from __future__ import annotations

import asyncio
import datetime

import pytest
from pywbem import CIMDateTime, CIMInstance, CIMInstanceName, CIMProperty

from cim_provider.domain.records import (DomainConfig, DomainRecord, DomainStats,
                                         RunningDomain, RunState, StatsSample)
from cim_provider.providers import metrics as m
from cim_provider.wbem import render
from cim_provider.wbem import writer as w
from cim_provider.wbem.repository import Repository

UUID = "5e1f0000-0000-4000-8000-000000000001"
NS = "root/virt"


@pytest.fixture(scope="module")
def value_class():
    return Repository.load().namespace(NS).get(m.VALUE_CLASS)


def record(name: str = "web", version: int = 7) -> DomainRecord:
    cfg = DomainConfig(uuid=UUID, name=name, type="Test", vcpus=2)
    return DomainRecord(uuid=UUID, running=RunningDomain(config=cfg, state=RunState.RUNNING),
                        version=version)


OLD = StatsSample(time=1_700_000_000.0, monotonic=500.0, stats={UUID: DomainStats(
    cpu_time_ns=10 * 10**9, vcpus=2, memory_used_kib=100, block_rd_bytes=1000,
    block_wr_bytes=0, net_rx_bytes=5, net_tx_bytes=7)})
NEW = StatsSample(time=1_700_000_010.25, monotonic=510.0, stats={UUID: DomainStats(
    cpu_time_ns=15 * 10**9, vcpus=2, memory_used_kib=150, block_rd_bytes=3000,
    block_wr_bytes=10, net_rx_bytes=5, net_tx_bytes=9)})


def expected(cls, name: str, title: str, value: str) -> CIMInstance:
    """The instance written out property by property, as pywbem holds it."""
    iid = f"VIRT:metric:{UUID}:{name}"
    values = {"InstanceID": iid, "MetricDefinitionId": f"VIRT:metric:{name}",
              "MeasuredElementName": "web", "ElementName": f"{title} of web",
              "TimeStamp": CIMDateTime(datetime.datetime.fromtimestamp(
                  NEW.time, datetime.timezone.utc)),
              "Duration": CIMDateTime(datetime.timedelta(seconds=10)),
              "MetricValue": value, "Volatile": True}
    props = {}
    for key, v in values.items():
        d = cls.properties[key]
        props[d.name] = CIMProperty(d.name, v, type=d.type, reference_class=d.reference_class,
                                    embedded_object=d.embedded_object, is_array=d.is_array)
    return CIMInstance(cls.classname, properties=props, path=CIMInstanceName(
        cls.classname, {"InstanceID": iid}, namespace=NS))


WANT = {"cpu": ("CPU utilisation", "25.00"), "memory": ("Memory in use", "150"),
        "disk-read": ("Disk bytes read", "2000"), "disk-write": ("Disk bytes written", "10"),
        "net-rx": ("Network bytes received", "0"), "net-tx": ("Network bytes sent", "2")}


def test_rendered_value_is_the_expected_instance(value_class):
    got = m.system_values(m.ValueBuilder(value_class), record(), NEW, OLD)
    assert [v["MetricDefinitionId"] for v in got] == [f"VIRT:metric:{k}" for k in m.METRICS]
    for inst in got:
        name = inst["MetricDefinitionId"][len(m.PREFIX):]
        want = expected(value_class, name, *WANT[name])
        assert inst == want
        assert inst.path == want.path and inst.properties == want.properties
        assert render.body_of(inst) == w.instance_xml(want).encode()
        assert render.name_of(inst) == w.instancename_xml(want.path).encode()


def test_first_sample_has_only_point_values(value_class):
    got = m.system_values(m.ValueBuilder(value_class), record(), NEW, None)
    assert [v["MetricDefinitionId"] for v in got] == ["VIRT:metric:memory"]
    assert got[0]["Duration"] == CIMDateTime(datetime.timedelta(0))
    assert m.system_values(m.ValueBuilder(value_class), record(), None, None) == []
    passive = DomainRecord(uuid=UUID, defined=DomainConfig(uuid=UUID, name="web"))
    assert m.system_values(m.ValueBuilder(value_class), passive, NEW, OLD) == []


class _Inventory:
    def __init__(self, resources, records):
        self.resources, self._records = resources, tuple(records)

    def records(self):
        return self._records

    def get(self, uuid):
        return next((r for r in self._records if r.uuid == uuid), None)


class _Backend:
    def __init__(self, inventory, cls, def_cls):
        self.inventory, self._cls = inventory, {m.VALUE_CLASS: cls, m.DEF_CLASS: def_cls}

    def cls(self, name, namespace=NS):
        return self._cls[name]


def test_provider_reads_agree_and_a_sample_keeps_nothing(value_class):
    from cim_provider.inventory.resources import HostResources
    repo = Repository.load().namespace(NS)
    res = HostResources()
    res.set_sampling(10.0)
    backend = _Backend(_Inventory(res, [record()]), value_class, repo.get(m.DEF_CLASS))
    provider = m.MetricsProvider(backend)         # type: ignore[arg-type]  # duck-typed
    assert asyncio.run(provider.enumerate_instances(m.VALUE_CLASS)) == ()
    res.set_sample(OLD)
    res.set_sample(NEW)
    every = asyncio.run(provider.enumerate_instances(m.VALUE_CLASS))
    assert len(every) == 6
    for inst in every:
        name = inst["MetricDefinitionId"][len(m.PREFIX):]
        assert inst == expected(value_class, name, *WANT[name])
        got = asyncio.run(provider.get_instance(m.value_path(UUID, name)))
        assert got == inst and render.body_of(got) == render.body_of(inst)
    # built once per sample and record version
    assert provider.values_of(record()) is provider.values_of(record())
    res.set_sample(StatsSample(time=NEW.time + 10, monotonic=520.0, stats={}))
    assert provider._values.data == {} and provider._all is None
    assert provider.values_of(record()) == []
