"""The Manager client tells the truth at every moment (issue 17).

1. Right after RequestStateChange(2) returns 0 through a Manager without ListDomains,
   the very next read shows the system running-only (no ElementSettingData): the
   periodic re-list is set far away (60 s), so only the bridge's own update can make
   it so. With a Manager that has ListDomains, the twin is shown, from its answer.
2. A Manager whose first listing is slower than the call timeout: passive domains
   appear as soon as the listing returns (no periodic wait), and before that the host
   and the management service say Degraded with the reason. A listing that never
   returns keeps them Degraded and is retried.

The Managers here are small services of the tests (tests/support/model.py's
RecordingManager and the subclasses below), not the reference Manager.
"""
import asyncio
import threading
from typing import Set

import pytest

try:
    from tests.support.model import (MinimalModel, RecordingManager, cs_path,
                                      domain_config, host_path, poll_until, rsc, vsms_path)
except ImportError:
    from support.model import (MinimalModel, RecordingManager, cs_path,  # type: ignore
                               domain_config, host_path, poll_until, rsc, vsms_path)

from cim_provider.contract import config_to_dbus
from cim_provider.contract.bus import method
from cim_provider.domain.domxml import config_to_domain_xml

pytestmark = pytest.mark.dbus

ESD = "VIRT_ElementSettingData"


class TwinManager(RecordingManager):
    """Also ListDomains: a started definition stays listed, with Active true."""

    def __init__(self, conn, configs=()) -> None:
        super().__init__(conn, configs)
        self.active: Set[str] = set()

    @method()
    async def ListDomains(self) -> "aa{sv}":
        self.calls.append(("ListDomains",))
        return [config_to_dbus(c, active=c.uuid in self.active) for c in self.entries.values()]

    @method()
    async def StartDomain(self, uuid: "s") -> "s":
        self.calls.append(("StartDomain", uuid))
        cfg = self.entries[uuid]
        loop = asyncio.get_running_loop()
        dom = await loop.run_in_executor(None, self.conn.createXML,
                                         config_to_domain_xml(cfg), 0)
        self.active.add(uuid)
        return dom.UUIDString()


class SlowListManager(RecordingManager):
    """ListInactiveDomains answers only once the test sets `release` (a listing that
    takes as long as the test wants, never a guess at timing)."""

    def __init__(self, conn, configs=()) -> None:
        super().__init__(conn, configs)
        self.release = threading.Event()
        self.list_calls = 0

    @method()
    async def ListInactiveDomains(self) -> "aa{sv}":
        self.list_calls += 1
        while not self.release.is_set():
            await asyncio.sleep(0.02)
        return [config_to_dbus(c) for c in self.entries.values()]


def Model(manager_cls, configs, *, manager_timeout: float = 5.0,
          list_timeout: float = 60.0) -> MinimalModel:
    """The periodic re-list 60 s away: only the bridge's own updates can show a change."""
    return MinimalModel(configs, relist=60.0, manager_timeout=manager_timeout,
                        manager_class=manager_cls, manager_list_timeout=list_timeout)


def twins(conn, uuid):
    return [p["InstanceID"] for p in conn.AssociatorNames(cs_path(uuid), AssocClass=ESD)]


def health(conn):
    host = conn.GetInstance(host_path())
    vsms = conn.GetInstance(vsms_path())
    return [(i["OperationalStatus"], i["HealthState"], i.get("StatusDescriptions"))
            for i in (host, vsms)]


@pytest.mark.parametrize("manager_cls,expected", [
    (RecordingManager, []),                         # two methods: running-only at once
    (TwinManager, ["VIRT:defined:{uuid}"]),         # ListDomains: the twin, as it says
], ids=["two-method", "with-ListDomains"])
def test_the_next_read_after_a_start_is_final(manager_cls, expected):
    cfg = domain_config(f"truth-{manager_cls.__name__.lower()}", memory_kib=65536)
    model = Model(manager_cls, [cfg])
    try:
        conn = model.conn()
        assert twins(conn, cfg.uuid) == [f"VIRT:defined:{cfg.uuid}"]
        assert rsc(conn, cfg.uuid, 2) == 0
        # the very next read, no polling: the periodic re-list is 60 s away
        assert twins(conn, cfg.uuid) == [e.format(uuid=cfg.uuid) for e in expected]
        inst = conn.GetInstance(cs_path(cfg.uuid))
        assert (inst["EnabledState"], inst["RequestedState"]) == (2, 2)
        conn.close()
    finally:
        model.close()


def test_a_slow_first_listing_is_degraded_until_it_returns_then_shown_at_once():
    cfg = domain_config("truth-slow-list", memory_kib=65536)
    # the call timeout is 1 s; the listing answers when released, well after it
    model = Model(SlowListManager, [cfg], manager_timeout=1.0)
    try:
        conn = model.conn()
        poll_until(lambda: model.manager.list_calls >= 1, what="the first listing asked")
        for status, state, why in health(conn):
            assert (status, state) == ([3], 10)
            assert len(why) == 1 and why[0].startswith(
                "passive domains not listed yet: waiting for the Manager since ")
        names = conn.EnumerateInstanceNames("VIRT_ComputerSystem")
        assert cfg.uuid not in {i["Name"] for i in names}
        # still the first call, long past the 1 s call timeout: listings get their own
        assert model.manager.list_calls == 1
        model.manager.release.set()
        # Shown as soon as the listing returns: the periodic re-list is 60 s away and
        # this waits at most 20 s.
        poll_until(lambda: cfg.uuid in {i["Name"] for i in conn.EnumerateInstanceNames(
            "VIRT_ComputerSystem")}, within=20, what="the passive domain listed")
        assert model.manager.list_calls == 1          # one slow listing, not given up on
        assert health(conn) == [([2], 5, None), ([2], 5, None)]
        conn.close()
    finally:
        model.close()


def test_a_listing_that_never_returns_stays_degraded_and_is_retried():
    cfg = domain_config("truth-stuck-list", memory_kib=65536)
    model = Model(SlowListManager, [cfg], manager_timeout=0.5, list_timeout=1.0)
    try:
        conn = model.conn()
        # retried at once after each timeout, not after the 60 s periodic interval
        poll_until(lambda: model.manager.list_calls >= 3, within=20, what="listing retried")
        for status, state, why in health(conn):
            assert (status, state) == ([3], 10)
            assert "passive domains not listed yet" in why[0]
            assert "got no answer within 1 s" in why[0]
        assert cfg.uuid not in {i["Name"] for i in conn.EnumerateInstanceNames(
            "VIRT_ComputerSystem")}
        model.manager.release.set()       # and once it answers, all is well
        poll_until(lambda: health(conn) == [([2], 5, None), ([2], 5, None)],
                   within=20, what="healthy after the listing")
        conn.close()
    finally:
        model.manager.release.set()
        model.close()
