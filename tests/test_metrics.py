"""Acceptance (usage metrics, DSP1053 Base Metrics) against libvirt's test driver
in-process: definitions are stable, values exist per running system and metric with
TimeStamp and Duration, move with every sample and with the domains' state, and come
from one sample per interval (one listing, statistics in slices), never from a request.
"""
import time
import uuid as uuidlib

import libvirt
import pytest
import pywbem

try:
    from tests.support.lvserver import LibvirtServer
    from tests.support.model import TEST_UUID, VIRT, cs_path, iid_path, keys, wbem_cs, wbemcli
except ImportError:
    from support.lvserver import LibvirtServer  # type: ignore
    from support.model import TEST_UUID, VIRT, cs_path, iid_path, keys, wbem_cs, wbemcli  # type: ignore

from cim_provider.domain.records import DomainStats
from cim_provider.inventory.resources import usage_between

METRICS = ("cpu", "memory", "disk-read", "disk-write", "net-rx", "net-tx")
INTERVAL = 0.3


@pytest.fixture
def srv():
    s = LibvirtServer(metrics_interval=INTERVAL)
    yield s
    s.close()


def samples(srv) -> int:
    return srv.on_loop(lambda: srv.resources.samples)


def after_samples(srv, n: int = 2) -> None:
    """Wait until `n` more samples were taken."""
    start = samples(srv)
    srv.wait(lambda: srv.resources.samples >= start + n, within=10, what=f"{n} samples")


def values_of(conn, uuid):
    return {v["MetricDefinitionId"].split(":")[-1]: v
            for v in conn.EnumerateInstances("VIRT_BaseMetricValue")
            if v["InstanceID"].startswith(f"VIRT:metric:{uuid}:")}


def test_definitions_are_stable(srv):
    c = srv.conn()
    first = c.EnumerateInstances("VIRT_BaseMetricDefinition")
    assert sorted(d["Id"] for d in first) == sorted(f"VIRT:metric:{m}" for m in METRICS)
    cpu = next(d for d in first if d["Id"] == "VIRT:metric:cpu")
    assert (cpu["Units"], cpu["ProgrammaticUnits"], cpu["TimeScope"], cpu["GatheringType"]) == \
        ("Percent", "percent", 3, 3)
    after_samples(srv)
    again = c.EnumerateInstances("VIRT_BaseMetricDefinition")
    assert [dict(d.items()) for d in again] == [dict(d.items()) for d in first]
    for d in first:
        assert dict(c.GetInstance(d.path).items()) == dict(d.items())


def test_values_per_running_system_with_time_stamp_and_duration(srv):
    after_samples(srv)
    c = srv.conn()
    values = values_of(c, TEST_UUID)
    assert sorted(values) == sorted(METRICS)
    for name, v in values.items():
        assert v["MeasuredElementName"] == "test" and v["Volatile"] is True
        assert v["InstanceID"] == f"VIRT:metric:{TEST_UUID}:{name}"
        age = time.time() - v["TimeStamp"].datetime.timestamp()
        assert 0 <= age < 5, age
        assert v["Duration"].is_interval
        assert 0.1 < v["Duration"].timedelta.total_seconds() < 5
    assert 0.0 <= float(values["cpu"]["MetricValue"]) <= 100.0
    for name in METRICS[1:]:
        assert int(values[name]["MetricValue"]) >= 0
    # memory in use, from the balloon: what the guest has minus what it leaves unused
    stats = srv.libvirt.lookupByUUIDString(TEST_UUID).memoryStats()
    assert int(values["memory"]["MetricValue"]) == stats["available"] - stats["unused"]


def test_values_move(srv):
    c = srv.conn()
    after_samples(srv)
    before = values_of(c, TEST_UUID)
    dom = srv.libvirt.lookupByUUIDString(TEST_UUID)
    memory = dom.info()[2]
    dom.setMemory(memory // 2)
    try:
        after_samples(srv)
        after = values_of(c, TEST_UUID)
        assert after["cpu"]["TimeStamp"].datetime > before["cpu"]["TimeStamp"].datetime
        assert int(after["memory"]["MetricValue"]) < int(before["memory"]["MetricValue"])
        assert after["disk-read"]["MetricValue"] != "" and \
            after["net-rx"]["TimeStamp"] != before["net-rx"]["TimeStamp"]
    finally:
        dom.setMemory(memory)


def test_values_follow_the_domains_state(srv):
    c = srv.conn()
    uuid = str(uuidlib.uuid4())
    dom = srv.libvirt.createXML(
        f"<domain type='test'><name>measured</name><uuid>{uuid}</uuid><memory>131072</memory>"
        "<vcpu>2</vcpu><os><type>hvm</type></os></domain>", 0)
    try:
        srv.wait(lambda: srv.inventory.get(uuid), what="the new domain")
        assert values_of(c, uuid) == {}           # not sampled yet: no figures invented
        after_samples(srv)
        values = values_of(c, uuid)
        assert {"cpu", "memory"} <= set(values)
        defs = c.AssociatorNames(cs_path(uuid), AssocClass="VIRT_MetricDefForME")
        assert len(defs) == 6
        assert keys(c.AssociatorNames(cs_path(uuid), AssocClass="VIRT_MetricForME")) == \
            keys(v.path for v in values.values())
    finally:
        dom.destroy()
    srv.wait(lambda: srv.inventory.get(uuid) is None, what="the domain gone")
    assert values_of(c, uuid) == {}
    after_samples(srv, 1)
    assert values_of(c, uuid) == {}


def test_one_bulk_call_per_interval_and_none_per_request(srv):
    """Reads are served from the last sample; libvirt lists the active domains once per
    interval (sources/libvirt_stats.list_active), never per request."""
    calls = []
    real = srv.libvirt.listAllDomains

    def counting(flags=0):
        if flags == libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE:
            calls.append(time.monotonic())
        return real(flags)

    srv.libvirt.listAllDomains = counting
    try:
        start = samples(srv)
        c = srv.conn()
        t0 = time.monotonic()
        reads = 0
        while time.monotonic() - t0 < 3 * INTERVAL:
            c.EnumerateInstances("VIRT_BaseMetricValue")
            c.Associators(cs_path(TEST_UUID), AssocClass="VIRT_MetricForME")
            reads += 2
        taken = samples(srv) - start
        assert reads > 2 * taken
        assert abs(len(calls) - taken) <= 1, (len(calls), taken)
    finally:
        del srv.libvirt.listAllDomains


def test_metric_associations(srv):
    after_samples(srv)
    c = srv.conn()
    cpu_def = pywbem.CIMInstanceName("VIRT_BaseMetricDefinition", {"Id": "VIRT:metric:cpu"},
                                     namespace=VIRT)
    value = iid_path("VIRT_BaseMetricValue", f"VIRT:metric:{TEST_UUID}:cpu")
    assert keys(c.AssociatorNames(cpu_def, AssocClass="VIRT_MetricInstance")) >= keys([value])
    assert keys(c.AssociatorNames(value, AssocClass="CIM_MetricInstance")) == keys([cpu_def])
    assert keys(c.AssociatorNames(value, AssocClass="VIRT_MetricForME")) == \
        keys([cs_path(TEST_UUID)])
    assert keys([cs_path(TEST_UUID)]) <= keys(
        c.AssociatorNames(cpu_def, AssocClass="VIRT_MetricDefForME"))
    out = wbemcli("ain", "-ac", "VIRT_MetricForME", wbem_cs(srv.url, TEST_UUID)).stdout
    assert out.count("VIRT_BaseMetricValue.") == 6


def test_metrics_off():
    s = LibvirtServer(metrics_interval=0)
    try:
        c = s.conn()
        time.sleep(0.3)
        assert c.EnumerateInstances("VIRT_BaseMetricDefinition") == []
        assert c.EnumerateInstances("VIRT_BaseMetricValue") == []
        assert c.AssociatorNames(cs_path(TEST_UUID), AssocClass="VIRT_MetricDefForME") == []
        profiles = s.conn("interop").EnumerateInstances("CIM_RegisteredProfile")
        assert "Base Metrics" not in {p["RegisteredName"] for p in profiles}
        assert s.on_loop(lambda: s.resources.samples) == 0
    finally:
        s.close()


def test_usage_between_two_samples():
    old = DomainStats(cpu_time_ns=10 * 10**9, vcpus=2, memory_used_kib=100,
                      block_rd_bytes=1000, block_wr_bytes=0, net_rx_bytes=5, net_tx_bytes=7)
    new = DomainStats(cpu_time_ns=12 * 10**9, vcpus=2, memory_used_kib=150,
                      block_rd_bytes=3000, block_wr_bytes=10, net_rx_bytes=5, net_tx_bytes=9)
    u = usage_between(old, new, 100.0, 102.0, 1000.0)
    assert (u.duration, u.cpu_percent, u.memory_kib) == (2.0, 50.0, 150)
    assert (u.disk_read_bytes, u.disk_write_bytes, u.net_rx_bytes, u.net_tx_bytes) == \
        (2000, 10, 0, 2)
    restarted = DomainStats(cpu_time_ns=10**9, vcpus=2, memory_used_kib=150)
    u = usage_between(old, restarted, 100.0, 102.0, 1000.0)
    assert u.cpu_percent is None and u.memory_kib == 150        # a counter went back
    first = usage_between(None, new, None, 102.0, 1000.0)
    assert (first.duration, first.cpu_percent, first.memory_kib) == (None, None, 150)
