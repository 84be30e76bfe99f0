"""The audit trail (issue: audit log): every modifying operation -- InvokeMethod,
CreateInstance, ModifyInstance, DeleteInstance -- done or refused, is one line on the
`cim_provider.audit` logger and, with an audit file, one JSON line in it: time, user
(or `local`), client address, operation, target path, a parameter summary without
secrets, the result.

The server is the project's own, in-process: libvirt's test driver for the running
domain "test", the reference Manager (SQLite store) on a private bus for DefineSystem,
a users file with an operator (alice) and a reader (bob), pywbem as the client. One
extra class from the tests' repository (VIRT_TestKeys, with a provider that accepts
ModifyInstance) shows a ModifyInstance that succeeds: no class of the model accepts one.
The end-to-end test at the bottom runs `cim-provider serve --audit-log` and rotates the
file with SIGHUP, as logrotate would.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, Uint16

try:
    from tests.support import secure
    from tests.support import wbem_server as ws
    from tests.support.model import (HOST, TEST_UUID, LoopThread, cs_path, poll_until,
                                      reset_test_default, vsms_path)
except ImportError:  # tests/ itself on sys.path
    from support import secure  # type: ignore
    from support import wbem_server as ws  # type: ignore
    from support.model import (HOST, TEST_UUID, LoopThread, cs_path,  # type: ignore
                               poll_until, reset_test_default, vsms_path)

pytestmark = [pytest.mark.dbus, pytest.mark.timeout(180)]

USERS = {"alice": ("alice-password", "operator"), "bob": ("bob-password", "reader")}
LISTENER_PASSWORD = "Listener-S3cret-pw"        # must never be in a log or the audit file
MOF_PASSWORD = "Mof-Embedded-S3cret"
VSSD = "VIRT_VirtualSystemSettingData"
CS = "VIRT_ComputerSystem"
RASD = "VIRT_ResourceAllocationSettingData"


class AuditedServer:
    """start_server with real sources, a users file and an audit file."""

    def __init__(self, workdir: Path) -> None:
        from cim_provider.busdaemon import PrivateBus
        reset_test_default()
        self.workdir = workdir
        self.audit_path = workdir / "audit.log"
        self.lt = LoopThread()
        self.bus = PrivateBus()
        self.handle = self.manager = self.conn = None
        self.stores: list = []
        try:
            self.lt.run(self._start())
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.handle.addresses[0][1]}"

    async def _start(self) -> None:
        import libvirt

        from cim_provider.manager.service import serve_manager
        from cim_provider.manager.store import LibvirtConnection, LibvirtStore, SqliteStore
        from cim_provider.server import security
        from cim_provider.server.main import start_server, start_sources
        from cim_provider.sources.libvirt import ensure_event_loop_impl
        loop = asyncio.get_running_loop()
        ensure_event_loop_impl()
        self.conn = await loop.run_in_executor(None, libvirt.open, "test:///default")
        shared = LibvirtConnection("test:///default", conn=self.conn)
        self.stores = [SqliteStore(self.workdir / "definitions.db"), LibvirtStore(shared)]
        self.manager = await serve_manager(self.bus.address, self.stores, shared)
        sources = await start_sources(libvirt_conn=self.conn, manager_bus=self.bus.address)
        args = argparse.Namespace(users=secure.write_users(self.workdir / "users", USERS),
                                  login_burst=50, login_refill=0.1)
        sec = security.prepare(args, listen=[("127.0.0.1", 0)], https=[],
                               state_dir=self.workdir / "state", host=HOST)
        repo = ws.test_repository()
        self.handle = await start_server(
            sec.listen, repo=repo, sources=sources, host=HOST,
            state_dir=self.workdir / "state", authenticate=sec.authenticate,
            providers=[modifiable_keys(repo)], audit_log=self.audit_path)

    def client(self, user: str | None, namespace: str = "root/virt") -> pywbem.WBEMConnection:
        creds = None if user is None else (user, USERS[user][0])
        return pywbem.WBEMConnection(self.url, creds, default_namespace=namespace, timeout=60)

    def wait_running(self, uuid: str) -> None:
        poll_until(lambda: self.client("bob").GetInstance(cs_path(uuid))["EnabledState"] == 2,
                   20, f"{uuid} running")

    def records(self, path: Path | None = None) -> list[dict]:
        text = (path or self.audit_path).read_text(encoding="utf-8")
        assert text.endswith("\n") or not text
        return [json.loads(line) for line in text.splitlines()]

    def reload(self) -> None:
        async def hooks():
            for hook in self.handle.on_reload:
                hook()
        self.lt.run(hooks())

    def close(self) -> None:
        async def shutdown():
            if self.handle is not None:
                await self.handle.close()
            if self.manager is not None:
                await self.manager.stop()
            for store in self.stores:
                store.close()
            if self.conn is not None:
                self.conn.close()
        try:
            reset_test_default()
            self.lt.run(shutdown(), 30)
        finally:
            self.lt.stop()
            self.bus.stop()


def modifiable_keys(repo):
    """VIRT_TestKeys instances whose Value may be modified."""
    from cim_provider.wbem.provider import Provider, build_instance
    ns = repo.namespace("root/virt")

    class ModifiableKeys(Provider):
        namespace = "root/virt"
        classnames = (ws.KEYS_CLASS,)

        def __init__(self) -> None:
            self.set("v0")

        def set(self, value: str) -> None:
            # a new instance object: the dispatcher keeps the XML it rendered of the old
            path = ws.keys_path(*ws.KEYS_INSTANCES[0])
            self.instances = [build_instance(ns.get(ws.KEYS_CLASS),
                                             {**path.keybindings, "Value": value}, path)]

        async def enumerate_instances(self, classname):
            return list(self.instances)

        async def modify_instance(self, instance, property_list, ctx):
            self.set(instance["Value"])

    return ModifiableKeys()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AuditedServer(tmp_path_factory.mktemp("audit"))
    yield srv
    srv.close()


@pytest.fixture
def audit_log(caplog):
    caplog.set_level(logging.INFO, logger="cim_provider.audit")
    return caplog


def new_records(server, before: int) -> list[dict]:
    return server.records()[before:]


def audit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cim_provider.audit"]


def no_secret_anywhere(server, caplog, *secrets: str) -> None:
    everything = server.audit_path.read_text() + caplog.text
    for secret in secrets + ("alice-password", "bob-password"):
        assert secret not in everything


# --- InvokeMethod --------------------------------------------------------------------

def test_request_state_change_done_and_refused(server, audit_log):
    server.wait_running(TEST_UUID)
    before = len(server.records())
    alice, bob = server.client("alice"), server.client("bob")
    rv, _ = alice.InvokeMethod("RequestStateChange", cs_path(TEST_UUID),
                               RequestedState=Uint16(9))
    assert rv == 0
    with pytest.raises(pywbem.CIMError) as err:
        bob.InvokeMethod("RequestStateChange", cs_path(TEST_UUID), RequestedState=Uint16(2))
    assert err.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED
    assert alice.InvokeMethod("RequestStateChange", cs_path(TEST_UUID),
                              RequestedState=Uint16(2))[0] == 0
    done, refused, back = new_records(server, before)
    for rec in (done, refused, back):
        assert (rec["operation"], rec["method"], rec["namespace"]) == \
            ("InvokeMethod", "RequestStateChange", "root/virt")
        assert rec["client"] == "127.0.0.1"
        assert rec["target"] == ('root/virt:VIRT_ComputerSystem.CreationClassName='
                                 f'"VIRT_ComputerSystem",Name="{TEST_UUID}"')
        when = datetime.datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
        assert time.time() - 60 < when.timestamp() <= time.time()
    assert (done["user"], done["params"], done["ok"], done["return_value"], done["result"]) \
        == ("alice", {"RequestedState": "9"}, True, "0", "0")
    assert (refused["user"], refused["params"], refused["ok"], refused["error_code"],
            refused["error_name"], refused["result"]) == \
        ("bob", {"RequestedState": "2"}, False, 2, "CIM_ERR_ACCESS_DENIED",
         "CIM_ERR_ACCESS_DENIED (2)")
    lines = audit_lines(audit_log)[-3:]
    assert "user=alice client=127.0.0.1 InvokeMethod RequestStateChange root/virt:" \
        "VIRT_ComputerSystem.CreationClassName=" in lines[0]
    assert lines[0].endswith(" (RequestedState=9) -> 0")
    assert lines[1].startswith(refused["time"] + " user=bob client=127.0.0.1 ")
    assert lines[1].endswith(" (RequestedState=2) -> CIM_ERR_ACCESS_DENIED (2)")


def test_a_method_that_returns_an_error_code(server, audit_log):
    """A return value other than 0 is what the record says; a parameter the method
    refuses is its CIM error."""
    before = len(server.records())
    alice = server.client("alice")
    rv, _ = alice.InvokeMethod("RequestStateChange", cs_path(TEST_UUID),
                               RequestedState=Uint16(55555))       # a vendor value
    assert rv == 1
    with pytest.raises(pywbem.CIMError) as err:
        alice.InvokeMethod("RequestStateChange", cs_path(TEST_UUID))
    assert err.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    vendor, missing = new_records(server, before)
    assert (vendor["ok"], vendor["return_value"], vendor["params"]) == \
        (True, "1", {"RequestedState": "55555"})
    assert (missing["ok"], missing["error_name"], missing["error_code"], missing["params"]) == \
        (False, "CIM_ERR_INVALID_PARAMETER", 4, {})
    assert audit_lines(audit_log)[-1].endswith(
        f'Name="{TEST_UUID}" -> CIM_ERR_INVALID_PARAMETER (4)')


def test_define_system_done_and_refused(server, audit_log):
    before = len(server.records())
    vssd = CIMInstance(VSSD, properties={"ElementName": "audit-vm",
                                         "VirtualSystemType": "Test"})
    rasd = CIMInstance(RASD, properties={"ResourceType": Uint16(3),
                                         "VirtualQuantity": pywbem.Uint64(1)})
    rv, out = server.client("alice").InvokeMethod("DefineSystem", vsms_path(),
                                                  SystemSettings=vssd,
                                                  ResourceSettings=[rasd])
    assert rv == 0
    with pytest.raises(pywbem.CIMError) as err:
        server.client("bob").InvokeMethod("DefineSystem", vsms_path(), SystemSettings=vssd)
    assert err.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED
    # MOF text as wbemcli users type it, with a secret in it: only its class is shown
    mof = (f'instance of {VSSD} {{ ElementName = "audit-mof"; '
           f'Notes = {{"root password is {MOF_PASSWORD}"}}; }};')
    rv2, _ = server.client("alice").InvokeMethod("DefineSystem", vsms_path(),
                                                 SystemSettings=mof)
    assert rv2 == 0
    done, refused, mof_rec = new_records(server, before)
    assert done["method"] == "DefineSystem" and done["target"].startswith(
        "root/virt:VIRT_VirtualSystemManagementService.CreationClassName=")
    # embedded instances: class and key properties (and ElementName) only
    assert done["params"] == {"SystemSettings": f'{VSSD}{{ElementName="audit-vm"}}',
                              "ResourceSettings": f"[{RASD}{{}}]"}
    assert (done["ok"], done["return_value"]) == (True, "0")
    assert (refused["user"], refused["error_name"]) == ("bob", "CIM_ERR_ACCESS_DENIED")
    assert refused["params"] == {"SystemSettings": f'{VSSD}{{ElementName="audit-vm"}}'}
    assert mof_rec["params"] == {"SystemSettings": f"{VSSD}{{embedded MOF, {len(mof)} chars}}"}
    assert mof_rec["return_value"] == "0"
    no_secret_anywhere(server, audit_log, MOF_PASSWORD)
    assert "VirtualSystemType" not in server.audit_path.read_text()    # not a key


# --- CreateInstance / ModifyInstance / DeleteInstance in interop ----------------------

def destination(name: str) -> CIMInstance:
    return CIMInstance("CIM_ListenerDestinationCIMXML", properties={
        "Name": name, "Destination": "https://127.0.0.1:5999", "username": "console",
        "password": LISTENER_PASSWORD})


def test_subscriptions_created_modified_deleted_and_refused(server, audit_log):
    before = len(server.records())
    alice = server.client("alice", "interop")
    bob = server.client("bob", "interop")

    def refused(fn) -> None:
        with pytest.raises(pywbem.CIMError) as err:
            fn()
        assert err.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED

    refused(lambda: bob.CreateInstance(destination("audit-dest")))
    dest = alice.CreateInstance(destination("audit-dest"))
    flt = alice.CreateInstance(CIMInstance("CIM_IndicationFilter", properties={
        "Name": "audit-filter", "QueryLanguage": "WQL", "SourceNamespaces": ["root/virt"],
        "Query": "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA "
                 "VIRT_ComputerSystem AND SourceInstance.EnabledState = 9"}))
    sub = alice.CreateInstance(CIMInstance("CIM_IndicationSubscription",
                                           properties={"Filter": flt, "Handler": dest}))
    changed = alice.GetInstance(flt)
    changed["Query"] = "SELECT * FROM CIM_InstModification"
    with pytest.raises(pywbem.CIMError) as err:          # filters are not modifiable
        alice.ModifyInstance(changed, PropertyList=["Query"])
    assert err.value.status_code == pywbem.CIM_ERR_NOT_SUPPORTED
    refused(lambda: bob.ModifyInstance(changed, PropertyList=["Query"]))
    refused(lambda: bob.DeleteInstance(sub))
    for path in (sub, flt, dest):
        alice.DeleteInstance(path)

    recs = new_records(server, before)
    assert [(r["user"], r["operation"], r["ok"]) for r in recs] == [
        ("bob", "CreateInstance", False), ("alice", "CreateInstance", True),
        ("alice", "CreateInstance", True), ("alice", "CreateInstance", True),
        ("alice", "ModifyInstance", False), ("bob", "ModifyInstance", False),
        ("bob", "DeleteInstance", False), ("alice", "DeleteInstance", True),
        ("alice", "DeleteInstance", True), ("alice", "DeleteInstance", True)]
    bob_create, create_dest, create_flt, create_sub, modify, bob_modify, bob_delete, \
        delete_sub, delete_flt, delete_dest = recs
    # the destination's password is masked, done or refused
    for rec in (bob_create, create_dest):
        assert rec["target"] == "interop:CIM_ListenerDestinationCIMXML"
        assert rec["params"]["NewInstance"] == (
            'CIM_ListenerDestinationCIMXML{Name="audit-dest", '
            'Destination="https://127.0.0.1:5999", username="console", password=***}')
    assert bob_create["error_name"] == "CIM_ERR_ACCESS_DENIED"
    assert create_dest["created"].startswith("interop:CIM_ListenerDestinationCIMXML.")
    assert 'Name="audit-dest"' in create_dest["created"]
    assert create_dest["result"] == "created " + create_dest["created"]
    assert create_flt["params"]["NewInstance"].startswith('CIM_IndicationFilter{Name="audit-')
    assert "Query=\"SELECT * FROM CIM_InstModification WHERE SourceInstance ISA VIRT_" \
        in create_flt["params"]["NewInstance"]
    assert "...(" in create_flt["params"]["NewInstance"]             # the long query is cut
    assert create_sub["params"]["NewInstance"] == (
        f'CIM_IndicationSubscription{{Filter={create_flt["created"]}, '
        f'Handler={create_dest["created"]}}}')
    # a subscription's path holds the filter's and the destination's, quoted
    assert create_sub["created"].startswith(
        'interop:CIM_IndicationSubscription.Filter="interop:CIM_IndicationFilter.'
        'CreationClassName=\\"CIM_IndicationFilter\\",Name=\\"audit-filter\\",')
    assert "...(" not in create_sub["created"]
    for rec in (modify, bob_modify):       # only what PropertyList names is modified
        assert rec["target"] == create_flt["created"]
        assert rec["params"] == {
            "ModifiedInstance": 'CIM_IndicationFilter{Query="SELECT * FROM CIM_InstModification"}',
            "PropertyList": '["Query"]'}
    assert (modify["error_name"], bob_modify["error_name"]) == \
        ("CIM_ERR_NOT_SUPPORTED", "CIM_ERR_ACCESS_DENIED")
    assert bob_delete["target"] == delete_sub["target"] == create_sub["created"]
    assert bob_delete["params"] == {} and delete_sub["result"] == "OK"
    assert delete_flt["target"] == create_flt["created"]
    assert delete_dest["target"] == create_dest["created"]
    lines = audit_lines(audit_log)
    assert any(" user=bob client=127.0.0.1 DeleteInstance interop:CIM_IndicationSubscription."
               in line and line.endswith("-> CIM_ERR_ACCESS_DENIED (2)") for line in lines)
    no_secret_anywhere(server, audit_log, LISTENER_PASSWORD)


def test_modify_instance_that_succeeds(server, audit_log):
    before = len(server.records())
    conn = server.client("alice")
    inst = conn.GetInstance(ws.keys_path(*ws.KEYS_INSTANCES[0]))
    inst["Value"] = "changed " + "x" * 200
    conn.ModifyInstance(inst, PropertyList=["Value"])
    assert conn.GetInstance(inst.path)["Value"].startswith("changed ")
    (rec,) = new_records(server, before)
    assert (rec["operation"], rec["ok"], rec["result"]) == ("ModifyInstance", True, "OK")
    assert rec["target"] == ('root/virt:VIRT_TestKeys.KBool=True,KS64=-5,KStr="a",KU16=7')
    value = rec["params"]["ModifiedInstance"]
    assert 'Value="changed xxxx' in value and "...(208 chars)" in value
    assert len(value) < 400


def test_reads_are_not_audited(server):
    before = len(server.records())
    conn = server.client("bob")
    conn.EnumerateInstances("VIRT_ComputerSystem")
    conn.GetInstance(cs_path(TEST_UUID))
    assert new_records(server, before) == []


def test_audit_file_is_private_and_reopened_after_rotation(server, audit_log):
    assert stat.S_IMODE(server.audit_path.stat().st_mode) == 0o600
    conn = server.client("alice")
    inst = conn.GetInstance(ws.keys_path(*ws.KEYS_INSTANCES[0]))
    inst["Value"] = "before rotation"
    conn.ModifyInstance(inst)
    rotated = server.audit_path.with_name("audit.log.1")
    os.replace(server.audit_path, rotated)
    server.reload()                       # what SIGHUP does in `serve`
    assert stat.S_IMODE(server.audit_path.stat().st_mode) == 0o600
    inst["Value"] = "after rotation"
    conn.ModifyInstance(inst)
    assert '"before rotation"' in server.records(rotated)[-1]["params"]["ModifiedInstance"]
    (after,) = server.records()
    assert '"after rotation"' in after["params"]["ModifiedInstance"]


# --- without authentication ------------------------------------------------------------

def test_without_authentication_the_user_is_local(caplog):
    caplog.set_level(logging.INFO, logger="cim_provider.audit")
    srv = ws.InProcessServer(ws.make_test_providers)      # no users file, no audit file
    try:
        conn = pywbem.WBEMConnection(srv.url, default_namespace="interop", timeout=30)
        path = conn.CreateInstance(CIMInstance("CIM_IndicationFilter", properties={
            "Name": "f", "Query": "SELECT * FROM CIM_InstCreation", "QueryLanguage": "WQL",
            "SourceNamespaces": ["root/virt"]}))
        conn.DeleteInstance(path)
    finally:
        srv.stop()
    lines = audit_lines(caplog)
    assert len(lines) == 2
    created = lines[0].rsplit(" -> created ", 1)[1]
    assert created.startswith("interop:CIM_IndicationFilter.") and 'Name="f"' in created
    assert " user=local client=127.0.0.1 CreateInstance interop:CIM_IndicationFilter " \
        '(NewInstance=CIM_IndicationFilter{Name="f", ' in lines[0]
    assert f" user=local client=127.0.0.1 DeleteInstance {created} -> OK" in lines[1]


# --- the record itself -------------------------------------------------------------------

def test_secret_names_and_long_values_in_any_parameter():
    """Parameter and property names like *password*, *secret*, *credential* are masked
    at any depth; embedded CIM-XML text shows its class only; arrays and strings are cut."""
    from cim_provider.wbem.audit import audit_record
    from cim_provider.wbem.context import OperationContext
    from cim_provider.wbem.request import CIMRequest
    repo = ws.test_repository()
    embedded_xml = ('<INSTANCE CLASSNAME="VIRT_VirtualSystemSettingData"><PROPERTY '
                    'NAME="Notes" TYPE="string"><VALUE>pw hunter2</VALUE></PROPERTY></INSTANCE>')
    inner = CIMInstance(VSSD, properties={"InstanceID": "VIRT:x", "ElementName": "e",
                                          "Notes": ["hunter2"]})
    req = CIMRequest("1", False, "Frobnicate", "root/virt", {
        "AdminPassword": (None, "hunter2"), "client_secret": (None, "hunter2"),
        "Credentials": (None, ["hunter2"]), "Settings": (None, embedded_xml),
        "Embedded": (None, inner), "Many": (None, list(range(20))), "Text": (None, "y" * 500),
        "Ref": (None, CIMInstanceName("CIM_Foo", {"Password": "hunter2", "Id": "1"})),
        "Forged": (None, 'x"\n2025-01-01T00:00:00Z user=root')},
        target=CIMInstanceName(CS, {"CreationClassName": CS, "Name": "a\r\nb"},
                               namespace="root/virt"))
    ctx = OperationContext(client="192.0.2.1", user="carol", outcome=pywbem.Uint32(4097))
    rec = audit_record(req, ctx, repo)
    assert "hunter2" not in json.dumps(rec.params) + rec.target
    assert rec.params["AdminPassword"] == rec.params["client_secret"] == \
        rec.params["Credentials"] == "***"
    assert rec.params["Settings"] == f"{VSSD}{{embedded CIM-XML, {len(embedded_xml)} chars}}"
    assert rec.params["Embedded"] == f'{VSSD}{{InstanceID="VIRT:x", ElementName="e"}}'
    assert rec.params["Many"] == "[0, 1, 2, 3, 4, 5, 6, 7, ...(20 items)]"
    assert rec.params["Text"] == '"' + "y" * 80 + '...(500 chars)"'
    assert rec.params["Ref"] == 'root/virt:CIM_Foo.Id="1",Password=***'
    assert (rec.user, rec.client, rec.return_value, rec.result) == \
        ("carol", "192.0.2.1", "4097", "4097")
    # nothing the client sends can start a second log line
    assert rec.params["Forged"] == '"x\\"\\x0a2025-01-01T00:00:00Z user=root"'
    assert rec.target == f'root/virt:{CS}.CreationClassName="{CS}",Name="a\\x0d\\x0ab"'
    from cim_provider.server.audit import as_json, format_line
    assert "\n" not in format_line(rec) and "\n" not in as_json(rec)


# --- end to end: `cim-provider serve --audit-log`, rotated with SIGHUP ------------------

def test_serve_audit_log_rotated_with_sighup(tmp_path):
    audit = tmp_path / "audit.log"
    srv = ws.SubprocessServer(tmp_path / "serve.log", [
        "--libvirt-uri", "test:///default", "--manager-bus", "unix:path=/nonexistent",
        "--state-dir", str(tmp_path / "state"), "--audit-log", str(audit)])
    try:
        conn = pywbem.WBEMConnection(srv.url, default_namespace="interop", timeout=30)

        def create(name: str) -> CIMInstanceName:
            return conn.CreateInstance(CIMInstance("CIM_IndicationFilter", properties={
                "Name": name, "Query": "SELECT * FROM CIM_InstCreation",
                "QueryLanguage": "WQL", "SourceNamespaces": ["root/virt"]}))

        create("one")
        assert stat.S_IMODE(audit.stat().st_mode) == 0o600
        first = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [(r["user"], r["operation"], r["ok"]) for r in first] == \
            [("local", "CreateInstance", True)]
        os.replace(audit, tmp_path / "audit.log.1")
        srv.proc.send_signal(signal.SIGHUP)
        poll_until(audit.exists, 15, "the audit log reopened")
        create("two")
        second = [json.loads(line) for line in audit.read_text().splitlines()]
        assert len(second) == 1 and 'Name="two"' in second[0]["params"]["NewInstance"]
        assert srv.proc.poll() is None
        log = srv.log_text()
        assert "cim_provider.audit" in log and 'Name=\\"one\\"' not in log
        assert "user=local client=127.0.0.1 CreateInstance interop:CIM_IndicationFilter" in log
    finally:
        srv.stop()
