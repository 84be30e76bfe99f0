"""Templates (issue 15): the template files, their rendering, and the reference
Manager's ListTemplates / DefineFromTemplate on a private bus with libvirt's test
driver and an SQLite store (the CIM side is in test_templates_cim.py).

Three templates (tests/support/templates.py): a small server, a desktop with two NICs,
one whose disk path is built from the domain's name.
"""
import asyncio
import json
import time
import uuid as uuidlib

import libvirt
import pytest

from cim_provider.contract import BUS_NAME, INTERFACE, OBJECT_PATH
from cim_provider.contract.bus import (DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, Message,
                                       MessageType, Variant, connect, plain)
from cim_provider.domain.domxml import parse_domain_xml
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import SqliteStore, Templated
from cim_provider.manager.templates import (TemplateError, TemplateLibrary, load_template,
                                            variables_json)
from cim_provider.sources.manager import ManagerClient, ManagerError

try:
    from tests.support import eventually, reset_test_driver, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (fixture)
    from tests.support.templates import DESKTOP, NAMED, SERVER, write_templates
except ImportError:          # tests/ itself is on sys.path
    from support import eventually, reset_test_driver, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore  # noqa: F401 (fixture)
    from support.templates import DESKTOP, NAMED, SERVER, write_templates  # type: ignore

pytestmark = pytest.mark.dbus
ERR = "org.example.virt.Error."
U1 = "11111111-2222-3333-4444-555555555555"


# ---------------------------------------------------------------- files and rendering

def test_header_declares_variables_and_description():
    t = load_template("desktop", DESKTOP)
    assert t.description == "A desktop with two NICs."
    assert [v.spec() for v in t.variables] == ["owner=string", "vcpus=int:2",
                                               "memory_kib=int:524288", "sound=bool:true"]
    vcpus = t.variable("vcpus")
    assert (vcpus.minimum, vcpus.maximum, vcpus.description) == (1, 16, "virtual CPUs")
    assert len(t.version) == 16 and t.version != load_template("desktop", DESKTOP + " ").version


@pytest.mark.parametrize("text, words", [
    ("{# @var x: int #}{% include 'other.xml' %}", ["line 1", "{% include %}"]),
    ("{# @var x: int #}\n{% import 'm' as m %}", ["line 2", "{% import %}"]),
    ("{% extends 'base' %}", ["{% extends %}"]),
    ("{% from 'm' import f %}", ["{% from ... import %}"]),
    ("{% autoescape false %}{{ name }}{% endautoescape %}", ["autoescape", "not allowed"]),
    ("<name>{{ name|safe }}</name>", ["safe filter"]),
    ("<name>{{ nme }}</name>", ["undeclared", "nme"]),
    ("{#\n@var x: float = 1\n#}", ["line 2", "unknown type 'float'"]),
    ("{#\n\n@var name: string\n#}", ["line 3", "cannot be a variable name"]),
    ("{#\n@var x: int = abc\n#}", ["line 2", "must be an integer"]),
    ("{#\n@var x int\n#}", ["line 2", "expected '@var NAME: TYPE"]),
    ("{#\n@var x: string[1..2]\n#}", ["only int variables take a range"]),
    ("<a>\n{% if %}</a>", ["line 2"]),
])
def test_unsafe_or_broken_templates_are_refused_when_loaded(text, words):
    with pytest.raises(TemplateError) as err:
        load_template("bad", text)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def render(text, variables, name="web", uuid=U1):
    return load_template("t", text).render(uuid, name, variables, "test")


def test_every_value_is_escaped_and_never_evaluated():
    hostile = "</name><devices><disk type='file'/></devices>"
    xml, cfg = render(SERVER, {"disk": "/x'/><interface type='user'/><disk file='y",
                               "network": "{{ ''.__class__ }}"}, name=hostile)
    assert cfg.name == hostile                       # a name, not elements
    assert len(cfg.disks) == 1 and len(cfg.nics) == 1
    assert cfg.disks[0].source == "/x'/><interface type='user'/><disk file='y"
    assert cfg.nics[0].source == "{{ ''.__class__ }}"   # data: never rendered again
    assert "<interface type='user'/>" not in xml and "&lt;/name&gt;" in xml
    # unicode goes through as is
    _, cfg = render(NAMED, {"images": "/srv/bilder/äöü-日本"}, name="ünïcødé-名前")
    assert cfg.disks[0].source == "/srv/bilder/äöü-日本/ünïcødé-名前.qcow2"


def test_the_sandbox_refuses_attribute_tricks_in_a_template():
    t = load_template("evil", "{# @var x: string = a #}<domain><name>{{ name }}</name>"
                              "<uuid>{{ uuid }}</uuid>\n<title>{{ x.__class__.__mro__ }}"
                              "</title></domain>")
    with pytest.raises(TemplateError) as err:
        t.render(U1, "web", {}, "test")
    assert "line 2" in str(err.value) and "sandbox" in str(err.value)


@pytest.mark.parametrize("variables, words", [
    ({}, ["variable owner is required"]),
    ({"owner": "x", "vcpus": "many"}, ["variable vcpus", "integer", "'many'"]),
    ({"owner": "x", "vcpus": 0}, ["variable vcpus", "minimum 1"]),
    ({"owner": "x", "vcpus": 17}, ["variable vcpus", "maximum 16"]),
    ({"owner": "x", "sound": "perhaps"}, ["variable sound", "boolean"]),
    ({"owner": 7}, ["variable owner", "must be a string"]),
    ({"owner": "x" * (1 << 20)}, ["variable owner", "longer than 4096"]),
    ({"owner": "a\x01b"}, ["variable owner", "U+0001"]),
])
def test_bad_variables_are_named(variables, words):
    t = load_template("desktop", DESKTOP)
    with pytest.raises(TemplateError) as err:
        t.render(U1, "d", t.check(variables), "test")
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_unknown_variables_are_refused_and_strings_are_typed():
    t = load_template("desktop", DESKTOP)
    with pytest.raises(TemplateError) as err:
        t.check({"owner": "x", "colour": "red"})
    assert "no variable 'colour'" in str(err.value) and "owner, vcpus" in str(err.value)
    assert t.check({"owner": "x", "vcpus": "4", "sound": "no"}) == \
        {"owner": "x", "vcpus": 4, "sound": False}


def test_a_result_that_is_not_the_domain_is_refused():
    head = "{# @var x: int = 1 #}"
    for text, words in (
            (head + "<domain><name>{{ name }}</name>\n<uuid>{{ uuid }}</uuid>\n<vcpu>", ["line 3"]),
            (head + "<domain><name>other</name><uuid>{{ uuid }}</uuid></domain>",
             ["<name>{{ name }}</name>"]),
            (head + "<domain><name>{{ name }}</name></domain>", ["uuid"]),
            (head + "<domain><name>{{ name }}</name><uuid>{{ uuid }}</uuid>"
                    "<vcpu>{{ x * 10000 }}</vcpu></domain>", ["VCPUs 10000"]),
            (head + "{{ 1 // 0 }}", ["line 1", "ZeroDivisionError"])):
        with pytest.raises(TemplateError) as err:
            render(text, {})
        for w in words:
            assert w in str(err.value), (w, str(err.value))


def test_library_follows_the_directory(tmp_path, caplog):
    folder = write_templates(tmp_path / "t")
    (folder / "README").write_text("not a template")
    lib = TemplateLibrary(folder)
    assert lib.refresh() == {"server", "desktop", "named"}
    assert lib.refresh() == set()
    old = lib.get("server").version
    # a broken edit keeps the last good version, and says where
    (folder / "server.xml.j2").write_text(SERVER.replace("{{ vcpus }}", "{{ vcpus "))
    assert lib.refresh() == set() and lib.get("server").version == old
    assert "server.xml.j2" in caplog.text and "keeping its previous version" in caplog.text
    (folder / "server.xml.j2").write_text(SERVER.replace("Server", "Serveur"))
    assert lib.refresh() == {"server"} and lib.get("server").version != old
    (folder / "named.xml.j2").unlink()
    assert lib.refresh() == {"named"} and "named" not in lib.templates


# ---------------------------------------------------------------- the Manager

@pytest.fixture
def conn():
    c = libvirt.open("test:///default")
    reset_test_driver(c)
    yield c
    reset_test_driver(c)
    c.close()


class Signals:
    """Another bus client recording the Manager's signals."""

    async def start(self, address):
        self.seen = []
        self.bus = await connect(address)
        self.bus.add_message_handler(self._on)
        await self.bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH,
                                    interface=DBUS_INTERFACE, member="AddMatch", signature="s",
                                    body=[f"type='signal',interface='{INTERFACE}'"]))
        return self

    def _on(self, msg):
        if msg.message_type == MessageType.SIGNAL and msg.interface == INTERFACE:
            self.seen.append((msg.member, plain(list(msg.body))))

    async def call(self, member, signature="", body=()):
        reply = await self.bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                            interface=INTERFACE, member=member,
                                            signature=signature, body=list(body)))
        if reply.message_type == MessageType.ERROR:
            return reply.error_name, reply.body[0] if reply.body else ""
        return None, plain(reply.body)

    def stop(self):
        self.bus.disconnect()


async def _manager(address, conn, tmp_path, folder=None, poll=0.1):
    store = SqliteStore(tmp_path / "m.db")
    lib = TemplateLibrary(folder or write_templates(tmp_path / "templates"))
    handle = await serve_manager(address, [store], conn, poll_interval=poll, templates=lib)
    client = ManagerClient(address, call_timeout=10)
    await client.start()
    signals = await Signals().start(address)
    return handle, client, signals, store


async def _stop(handle, client, signals, store):
    signals.stop()
    await client.stop()
    await handle.stop()
    store.close()


def test_list_define_render_start(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path)
        try:
            assert client.offers("ListTemplates") and client.offers("DefineFromTemplate")
            await eventually(lambda: client.templates is not None, 5, "templates listed")
            by_name = {t["Name"]: t for t in client.templates}
            assert sorted(by_name) == ["desktop", "named", "server"]
            assert by_name["desktop"]["Variables"][0] == {
                "Name": "owner", "Type": "string", "Default": None,
                "Description": "who it is for"}
            assert by_name["desktop"]["Variables"][3]["Default"] is True
            assert by_name["server"]["Variables"][0]["Default"] == 1

            # the raw answer: typed defaults
            err, (raw,) = await sig.call("ListTemplates")
            assert err is None and [t["Name"] for t in raw] == ["desktop", "named", "server"]

            desk = await client.define_from_template(
                "desktop", {"name": "desk-bob", "owner": "Bob", "vcpus": "3", "Priority": 5})
            await client.refresh()
            cfg = client.definitions[desk]
            assert (cfg.name, cfg.title, cfg.vcpus, cfg.memory_kib) == \
                ("desk-bob", "Desktop of Bob", 3, 524288)
            assert [n.model for n in cfg.nics] == ["virtio", "e1000"]
            assert cfg.disks[0].source == "/var/lib/images/desktop-bob.qcow2"
            assert cfg.priority == 5
            err, (entry,) = await sig.call("GetDomain", "s", [desk])
            assert entry["Template"] == "desktop"
            assert entry["TemplateVariables"] == {"owner": "Bob", "vcpus": 3}
            row = store.list()[0].template
            assert (row.template, json.loads(row.variables)) == \
                ("desktop", {"owner": "Bob", "vcpus": 3})      # nothing rendered stored

            # StartDomain renders again and libvirt runs exactly that
            assert await client.start_domain(desk) == desk
            dom = conn.lookupByUUIDString(desk)
            xml = dom.XMLDesc(0)
            assert "<title>Desktop of Bob</title>" in xml and "desktop-bob.qcow2" in xml
            assert xml.count("<interface type='network'>") == 2
            assert "<sound model='ich6'" in xml and not dom.isPersistent()
            for nic in cfg.nics:
                assert nic.mac in xml
            await eventually(lambda: desk in client.active, 5, "Active")

            named = await client.define_from_template("named", {"name": "from-name"})
            await client.refresh()
            assert client.definitions[named].disks[0].source == \
                "/var/lib/images/from-name.qcow2"
        finally:
            await _stop(handle, client, sig, store)
    run(scenario())


def test_define_errors_name_the_variable_or_the_template(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path)
        try:
            cases = [
                ("nope", {"name": "x"}, "NotFound", ["no template 'nope'"]),
                ("desktop", {"name": "x"}, "InvalidArgument", ["variable owner is required"]),
                ("desktop", {"owner": "x"}, "InvalidArgument", ["variable name"]),
                ("server", {"name": "x", "vcpus": "lots"}, "InvalidArgument",
                 ["variable vcpus"]),
                ("server", {"name": "x", "colour": "red"}, "InvalidArgument",
                 ["no variable 'colour'"]),
                ("server", {"name": "x", "disk": "y" * 5000}, "InvalidArgument",
                 ["variable disk", "longer than 4096"]),
                ("server", {"name": "x", "uuid": "not-a-uuid"}, "InvalidArgument",
                 ["variable uuid"]),
                ("server", {"name": "x", "Priority": "high"}, "InvalidArgument", ["Priority"]),
            ]
            for template, variables, name, words in cases:
                with pytest.raises(ManagerError) as err:
                    await client.define_from_template(template, variables)
                assert err.value.name == ERR + name, (template, variables, err.value)
                for w in words:
                    assert w in err.value.message, (w, err.value.message)
            # a 1 MiB string over D-Bus: refused, named, and the Manager still answers
            err, text = await sig.call("DefineFromTemplate", "sa{sv}", [
                "server", {"name": Variant("s", "big"), "disk": Variant("s", "z" * (1 << 20))}])
            assert err == ERR + "InvalidArgument" and "variable disk" in text
            # a name that is taken, a UUID that is taken
            uuid = await client.define_from_template("server", {"name": "srv", "uuid": U1})
            assert uuid == U1
            for variables in ({"name": "srv"}, {"name": "other", "uuid": U1}):
                with pytest.raises(ManagerError) as err:
                    await client.define_from_template("server", variables)
                assert err.value.name == ERR + "InvalidArgument"
            # DefineDomain does not make templated definitions by accident
            err, text = await sig.call("DefineDomain", "a{sv}", [
                {"Name": Variant("s", "x"), "Template": Variant("s", "server")}])
            assert err == ERR + "InvalidArgument" and "DefineFromTemplate" in text
            assert [s.config.name for s in store.list()] == ["srv"]
        finally:
            await _stop(handle, client, sig, store)
    run(scenario())


def test_hostile_variables_reach_libvirt_as_data(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path)
        try:
            tricky = "x</name><devices><disk type='file'/>"
            uuid = await client.define_from_template("server", {
                "name": "hostile-1", "disk": "/img/{{ ''.__class__ }}'/><x y='" + tricky,
                "network": "default"})
            await client.refresh()
            cfg = client.definitions[uuid]
            assert len(cfg.disks) == 1 and cfg.disks[0].source.endswith(tricky)
            await client.start_domain(uuid)
            xml = conn.lookupByUUIDString(uuid).XMLDesc(0)
            assert xml.count("<disk ") == 1 and "<x y=" not in xml
            running = parse_domain_xml(xml)              # libvirt keeps it as a value,
            assert running.disks[0].source == cfg.disks[0].source   # never rendered again
            assert running.disks[0].source.startswith("/img/{{ ''.__class__ }}'/><x")
            # a name made of markup is only a name
            uuid2 = await client.define_from_template("named", {"name": "<b>&amp;</b>"})
            await client.refresh()
            assert client.definitions[uuid2].name == "<b>&amp;</b>"
            assert client.definitions[uuid2].disks[0].source == \
                "/var/lib/images/<b>&amp;</b>.qcow2"
        finally:
            await _stop(handle, client, sig, store)
    run(scenario())


def test_editing_a_template_rerenders_its_domains(dbus_address, conn, tmp_path):
    async def scenario():
        folder = write_templates(tmp_path / "templates")
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path, folder)
        try:
            a = await client.define_from_template("server", {"name": "a"})
            b = await client.define_from_template("server", {"name": "b", "vcpus": 2})
            c = await client.define_from_template("named", {"name": "c"})
            await client.refresh()
            assert client.definitions[a].title == "Server a"
            sig.seen.clear()
            time.sleep(0.01)            # a new mtime even on coarse file systems
            (folder / "server.xml.j2").write_text(SERVER.replace("<title>Server",
                                                                 "<title>Web server"))
            await eventually(lambda: ("DomainChanged", [a]) in sig.seen
                             and ("DomainChanged", [b]) in sig.seen,
                             5, "DomainChanged for each domain of the template")
            assert ("DomainChanged", [c]) not in sig.seen
            assert ("TemplatesChanged", []) in sig.seen
            await eventually(lambda: client.definitions[b].title == "Web server b", 5,
                             "the client re-listed")
            assert client.definitions[b].vcpus == 2
            # a broken edit keeps the domains as they were
            sig.seen.clear()
            (folder / "server.xml.j2").write_text("{% if %}")
            await asyncio.sleep(0.5)
            assert not [s for s in sig.seen if s[0] == "DomainChanged"]
            # the template goes away: its domains stay listed, say why, and cannot start
            (folder / "server.xml.j2").unlink()
            await eventually(lambda: "cannot be rendered" in (client.definitions[a].title or ""),
                             5, "unrenderable domain shown with its reason")
            with pytest.raises(ManagerError) as err:
                await client.start_domain(a)
            assert "no template 'server'" in err.value.message
            await client.undefine_domain(a)            # and can still be removed
        finally:
            await _stop(handle, client, sig, store)
    run(scenario())


def test_update_a_templated_definition(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path)
        try:
            uuid = await client.define_from_template("server", {"name": "upd"})
            await client.update_domain(uuid, {"VCPUs": 4, "MemoryKiB": 524288,
                                              "MaxMemoryKiB": 524288, "Name": "upd2",
                                              "Priority": 3, "MinMemoryKiB": 131072})
            cfg = await client.get_domain(uuid)
            assert (cfg.name, cfg.vcpus, cfg.memory_kib, cfg.priority, cfg.min_memory_kib) == \
                ("upd2", 4, 524288, 3, 131072)
            row = store.list()[0].template
            assert json.loads(row.variables) == {"vcpus": 4, "memory_kib": 524288}
            await client.update_domain(uuid, {"TemplateVariables": Variant("a{sv}", {
                "disk": Variant("s", "/img/new.qcow2")})})
            assert (await client.get_domain(uuid)).disks[0].source == "/img/new.qcow2"
            for changes, name, word in (
                    ({"Title": "other"}, "NotSupported", "title"),
                    ({"Disks": []}, "NotSupported", "disks"),
                    ({"VCPUs": 100}, "InvalidArgument", "variable vcpus"),
                    ({"TemplateVariables": Variant("a{sv}", {"zz": Variant("s", "1")})},
                     "InvalidArgument", "zz"),
                    ({"Template": "desktop"}, "NotSupported", "template")):
                with pytest.raises(ManagerError) as err:
                    await client.update_domain(uuid, changes)
                assert err.value.name == ERR + name and word in err.value.message, \
                    (changes, err.value)
        finally:
            await _stop(handle, client, sig, store)
    run(scenario())


def test_a_thousand_templated_rows(dbus_address, conn, tmp_path):
    """1,000 rows of variables in SQLite become 1,000 definitions, each rendered
    with its own values, listed in one go; a start renders its own again."""
    async def scenario():
        folder = write_templates(tmp_path / "templates")
        store = SqliteStore(tmp_path / "m.db")
        rows = []
        for i in range(1000):
            template = ("server", "desktop", "named")[i % 3]
            variables = {"server": {"vcpus": 1 + i % 4, "disk": f"/img/s{i}.qcow2"},
                         "desktop": {"owner": f"user{i}", "memory_kib": 65536 + i},
                         "named": {"images": f"/pool{i % 7}"}}[template]
            rows.append(Templated(str(uuidlib.UUID(int=i + 1)), f"vm-{i:04d}", template,
                                  variables_json(variables)))
        store.define_many_templated(rows)
        store.close()
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path, folder)
        try:
            defs = client.definitions
            assert len(defs) == 1000
            for i, row in enumerate(rows):
                cfg = defs[row.uuid]
                assert cfg.name == f"vm-{i:04d}"
                if i % 3 == 0:
                    assert cfg.vcpus == 1 + i % 4 and cfg.disks[0].source == f"/img/s{i}.qcow2"
                    assert len(cfg.nics) == 1
                elif i % 3 == 1:
                    assert cfg.title == f"Desktop of user{i}" and cfg.memory_kib == 65536 + i
                    assert len(cfg.nics) == 2 and cfg.nics[0].mac != cfg.nics[1].mac
                else:
                    assert cfg.disks[0].source == f"/pool{i % 7}/vm-{i:04d}.qcow2"
            macs = [n.mac for c in defs.values() for n in c.nics]
            assert len(set(macs)) == len(macs)
            started = time.monotonic()
            err, (entries,) = await sig.call("ListDomains")
            assert err is None and len(entries) == 1000
            assert time.monotonic() - started < 5
            assert {e["Template"] for e in entries} == {"server", "desktop", "named"}
            await client.start_domain(rows[3].uuid)
            assert "/img/s3.qcow2" in conn.lookupByUUIDString(rows[3].uuid).XMLDesc(0)
        finally:
            await _stop(handle, client, sig, store)
    run(scenario(), timeout=120)
