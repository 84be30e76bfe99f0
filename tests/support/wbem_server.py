"""WBEM servers for tests: the real `cim-provider serve` in a subprocess, and an
in-process server (its own asyncio loop in a thread) with test providers for
root/virt, so tests can see associations, methods and every CIM type.

Nothing here is a mock: both are the project's aiohttp server on loopback.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pywbem
from pywbem import (CIMClass, CIMDateTime, CIMError, CIMInstance, CIMInstanceName,
                    CIMMethod, CIMParameter, CIMProperty, CIMQualifier, Char16,
                    Real32, Real64, Sint8, Sint16, Sint32, Sint64, Uint8, Uint16, Uint32,
                    Uint64)

ROOT = Path(__file__).resolve().parents[2]
CIM_PROVIDER = ROOT / ".venv" / "bin" / "cim-provider"

VIRT = "root/virt"
TEST_HOST = "host.example.test"         # the host name the in-process server uses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_accepting(port: int, deadline: float, proc: subprocess.Popen | None = None) -> None:
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before accepting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not accept in time") from None
            time.sleep(0.05)


class SubprocessServer:
    """`.venv/bin/cim-provider serve --listen 127.0.0.1:<port>`."""

    def __init__(self, log_path: Path, extra_args: Iterable[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(CIM_PROVIDER), "serve", "--listen", f"127.0.0.1:{self.port}",
             "--log-level", "INFO", *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            wait_accepting(self.port, time.monotonic() + 30, self.proc)
        except Exception:
            self.stop()
            raise

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class InProcessServer:
    """`start_server(...)` on a private asyncio loop running in a daemon thread."""

    def __init__(self, providers_factory, *, limits=None, host: str = TEST_HOST):
        from cim_provider.server.main import start_server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="wbem-test-server")
        self.thread.start()
        self.repo = test_repository()
        self.providers = providers_factory(self.repo)
        fut = asyncio.run_coroutine_threadsafe(
            start_server([("127.0.0.1", 0)], repo=self.repo, host=host,
                         providers=list(self.providers.values()), limits=limits),
            self.loop)
        self.handle = fut.result(30)
        self.port = self.handle.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = host

    @property
    def dispatcher(self):
        return self.handle.dispatcher

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.handle.close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# --- a test class with every CIM type ------------------------------------------------

ALLTYPES_CLASS = "VIRT_TestAllTypes"

SCALAR_TYPES = ["uint8", "uint16", "uint32", "uint64", "sint8", "sint16", "sint32",
                "sint64", "real32", "real64", "boolean", "string", "char16", "datetime"]


def _q(name: str, value: Any, type_: str | None = None) -> CIMQualifier:
    return CIMQualifier(name, value, type=type_, propagated=False)


def alltypes_class(base: CIMClass) -> CIMClass:
    """VIRT_TestAllTypes : CIM_ManagedElement with one property per CIM type (scalar
    and array), a reference, an embedded instance and a method taking them all."""
    cls = CIMClass(ALLTYPES_CLASS, superclass=base.classname,
                   qualifiers=[_q("Description", "every CIM type", "string")])
    for p in base.properties.values():
        p2 = p.copy()
        p2.propagated = True
        cls.properties[p2.name] = p2
    own = [CIMProperty("Id", None, type="string", class_origin=ALLTYPES_CLASS,
                       propagated=False, qualifiers=[_q("Key", True, "boolean")])]
    for t in SCALAR_TYPES:
        own.append(CIMProperty(f"P_{t}", None, type=t, class_origin=ALLTYPES_CLASS,
                               propagated=False))
        own.append(CIMProperty(f"A_{t}", None, type=t, is_array=True,
                               class_origin=ALLTYPES_CLASS, propagated=False))
    own.append(CIMProperty("P_ref", None, type="reference", reference_class="CIM_ManagedElement",
                           class_origin=ALLTYPES_CLASS, propagated=False))
    own.append(CIMProperty("P_embedded", None, type="string", embedded_object="instance",
                           class_origin=ALLTYPES_CLASS, propagated=False,
                           qualifiers=[_q("EmbeddedInstance", "CIM_ManagedElement", "string")]))
    for p in own:
        cls.properties[p.name] = p
    params = []
    for t in SCALAR_TYPES:
        params.append(CIMParameter(f"In_{t}", t, qualifiers=[_q("In", True, "boolean")]))
        params.append(CIMParameter(f"InA_{t}", t, is_array=True,
                                   qualifiers=[_q("In", True, "boolean")]))
    params.append(CIMParameter("In_ref", "reference", reference_class="CIM_ManagedElement",
                               qualifiers=[_q("In", True, "boolean")]))
    params.append(CIMParameter("Out_echo", "string", is_array=True,
                               qualifiers=[_q("In", False, "boolean"),
                                           _q("Out", True, "boolean")]))
    params.append(CIMParameter("Out_ref", "reference", reference_class="CIM_ManagedElement",
                               qualifiers=[_q("In", False, "boolean"),
                                           _q("Out", True, "boolean")]))
    params.append(CIMParameter("Out_uint64", "uint64",
                               qualifiers=[_q("In", False, "boolean"),
                                           _q("Out", True, "boolean")]))
    params.append(CIMParameter("Out_null", "string",
                               qualifiers=[_q("In", False, "boolean"),
                                           _q("Out", True, "boolean")]))
    cls.methods["Echo"] = CIMMethod("Echo", "uint32", parameters=params,
                                    class_origin=ALLTYPES_CLASS, propagated=False,
                                    qualifiers=[_q("Static", True, "boolean")])
    return cls


KEYS_CLASS = "VIRT_TestKeys"


def keys_class(base: CIMClass) -> CIMClass:
    """VIRT_TestKeys : CIM_ManagedElement with string, uint16, sint64 and boolean keys."""
    cls = CIMClass(KEYS_CLASS, superclass=base.classname)
    for p in base.properties.values():
        p2 = p.copy()
        p2.propagated = True
        cls.properties[p2.name] = p2
    for name, t in (("KStr", "string"), ("KU16", "uint16"), ("KS64", "sint64"),
                    ("KBool", "boolean")):
        cls.properties[name] = CIMProperty(name, None, type=t, class_origin=KEYS_CLASS,
                                           propagated=False,
                                           qualifiers=[_q("Key", True, "boolean")])
    cls.properties["Value"] = CIMProperty("Value", None, type="string",
                                          class_origin=KEYS_CLASS, propagated=False)
    return cls


def keys_path(kstr: str, ku16: int, ks64: int, kbool: bool) -> CIMInstanceName:
    return CIMInstanceName(KEYS_CLASS, {"KStr": kstr, "KU16": Uint16(ku16),
                                        "KS64": Sint64(ks64), "KBool": kbool}, namespace=VIRT)


KEYS_INSTANCES = [("a", 7, -5, True), ("a", 7, -5, False), ("b&<c>", 65535, 2**62, True)]


def test_repository():
    """The project's repository plus VIRT_TestAllTypes in root/virt."""
    from cim_provider.wbem.repository import Namespace, Repository
    repo = Repository.load()
    out = {}
    for name in repo.namespace_names:
        ns = repo.namespace(name)
        classes = dict(ns.classes)
        if name == VIRT:
            classes[ALLTYPES_CLASS.lower()] = alltypes_class(ns.get("CIM_ManagedElement"))
            classes[KEYS_CLASS.lower()] = keys_class(ns.get("CIM_ManagedElement"))
        out[name] = Namespace(name, classes, ns.qualifiers)
    return Repository(out)


# --- test providers for root/virt ---------------------------------------------------

def _providers_module():
    from cim_provider.wbem import provider
    return provider


GUEST_UUIDS = ["1b4e28ba-2fa1-11d2-883f-0016d3cca427",
               "6f0c8a3e-0000-4d0e-9a4b-3c1a2b3c4d5e",
               "a9f3c2d1-5e6f-4a7b-8c9d-0e1f2a3b4c5d"]
INSTALL_DATE = CIMDateTime("20240102030405.123456+060")
STATE_CHANGE = CIMDateTime("20250607080910.000000-300")


def host_path() -> CIMInstanceName:
    return CIMInstanceName("VIRT_HostSystem", {"CreationClassName": "VIRT_HostSystem",
                                               "Name": TEST_HOST}, namespace=VIRT)


def guest_path(uuid: str) -> CIMInstanceName:
    return CIMInstanceName("VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem",
                                                   "Name": uuid}, namespace=VIRT)


def alltypes_path(ident: str) -> CIMInstanceName:
    return CIMInstanceName(ALLTYPES_CLASS, {"Id": ident}, namespace=VIRT)


def alltypes_values() -> dict[str, Any]:
    """One value per type; arrays with a NULL element are avoided (not for wbemcli)."""
    return {
        "P_uint8": Uint8(255), "A_uint8": [Uint8(0), Uint8(1)],
        "P_uint16": Uint16(65535), "A_uint16": [Uint16(2), Uint16(3)],
        "P_uint32": Uint32(4294967295), "A_uint32": [Uint32(4)],
        "P_uint64": Uint64(18446744073709551615), "A_uint64": [Uint64(2**40)],
        "P_sint8": Sint8(-128), "A_sint8": [Sint8(-1), Sint8(127)],
        "P_sint16": Sint16(-32768), "A_sint16": [Sint16(-2)],
        "P_sint32": Sint32(-2147483648), "A_sint32": [Sint32(7)],
        "P_sint64": Sint64(-9223372036854775808), "A_sint64": [Sint64(9223372036854775807)],
        "P_real32": Real32(1.5), "A_real32": [Real32(-0.25), Real32(float("inf"))],
        "P_real64": Real64(3.141592653589793), "A_real64": [Real64(1e300), Real64(-1e-300)],
        "P_boolean": False, "A_boolean": [True, False],
        "P_string": "<tag a=\"1\"> & 'quoted' \u00e9\u4e2d\u6587 \U0001F600",
        "A_string": ["x", "", "line1\nline2"],
        "P_char16": Char16("\u00e9"), "A_char16": [Char16("a"), Char16("&")],
        "P_datetime": INSTALL_DATE,
        "A_datetime": [CIMDateTime("00000001020304.000005:000"), STATE_CHANGE],
        "P_ref": host_path(),
        "P_embedded": CIMInstance("CIM_ManagedElement", properties={
            "ElementName": CIMProperty("ElementName", "inner & <embedded>",
                                       propagated=False),
            "Generation": CIMProperty("Generation", Uint64(7), propagated=False)}),
        "ElementName": "all types",
    }


def make_test_providers(repo) -> dict[str, Any]:
    """Providers for VIRT_HostSystem, VIRT_ComputerSystem, VIRT_HostedDependency and
    VIRT_TestAllTypes in root/virt, built with build_instance."""
    prov = _providers_module()
    ns = repo.namespace(VIRT)

    class HostProvider(prov.Provider):
        namespace = VIRT
        classnames = ("VIRT_HostSystem",)

        def __init__(self):
            self.instance = prov.build_instance(ns.get("VIRT_HostSystem"), {
                **host_path().keybindings, "ElementName": "the host",
                "EnabledState": 2, "OperationalStatus": [2], "HealthState": 5,
                "Dedicated": [0]}, host_path())

        async def enumerate_instances(self, classname):
            return [self.instance]

    class GuestProvider(prov.Provider):
        namespace = VIRT
        classnames = ("VIRT_ComputerSystem",)

        def __init__(self):
            self.instances = []
            self.calls: list[tuple[Any, str, dict]] = []
            for i, uuid in enumerate(GUEST_UUIDS):
                path = guest_path(uuid)
                self.instances.append(prov.build_instance(ns.get("VIRT_ComputerSystem"), {
                    **path.keybindings, "ElementName": f"guest-{i}",
                    "Caption": f"Guest {i} & <friends>",
                    "EnabledState": 2 if i != 2 else 3, "RequestedState": 12,
                    "OperationalStatus": [2] if i != 1 else [2, 6],
                    "HealthState": 5, "InstallDate": INSTALL_DATE,
                    "TimeOfLastStateChange": STATE_CHANGE,
                    "Generation": 2**63 + i,
                    "Roles": ["guest", f"number {i}"],
                    "Description": None}, path))

        async def enumerate_instances(self, classname):
            return list(self.instances)

        async def get_instance(self, path):
            # the dispatcher has normalized the keys: exact names and types
            for inst in self.instances:
                if inst.path.keybindings["Name"] == path.keybindings["Name"]:
                    return inst
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, "no such guest")

        async def invoke_method(self, target, method, params):
            self.calls.append((target, method, dict(params)))
            if method == "RequestStateChange":
                if params.get("RequestedState") not in (2, 3, 4):
                    return Uint32(4097), {}
                job = CIMInstanceName("CIM_ConcreteJob", {"InstanceID": "job-1"},
                                      namespace=VIRT)
                return Uint32(0), {"Job": job}
            if method == "SetPowerState":
                raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED, "no power control here")
            return await super().invoke_method(target, method, params)

    class HostedDependencyProvider(prov.AssociationProvider):
        namespace = VIRT
        classnames = ("VIRT_HostedDependency",)

        def __init__(self):
            cls = ns.get("VIRT_HostedDependency")
            self.instances = []
            for uuid in GUEST_UUIDS:
                keys = {"Antecedent": host_path(), "Dependent": guest_path(uuid)}
                path = CIMInstanceName("VIRT_HostedDependency", keys, namespace=VIRT)
                self.instances.append(prov.build_instance(cls, keys, path))

        async def enumerate_instances(self, classname):
            return list(self.instances)

    class AllTypesProvider(prov.Provider):
        namespace = VIRT
        classnames = (ALLTYPES_CLASS,)

        def __init__(self):
            cls = ns.get(ALLTYPES_CLASS)
            self.instances = [
                prov.build_instance(cls, {"Id": "full", **alltypes_values()},
                                    alltypes_path("full")),
                # every property NULL except the key
                prov.build_instance(cls, {"Id": "empty & <nulls>"},
                                    alltypes_path("empty & <nulls>")),
            ]
            self.calls: list[tuple[Any, str, dict]] = []

        async def enumerate_instances(self, classname):
            return list(self.instances)

        async def invoke_method(self, target, method, params):
            self.calls.append((target, method, dict(params)))
            echo = [f"{k}={type(v).__name__}:{_show(v)}" for k, v in sorted(params.items())]
            return Uint32(len(params)), {"Out_echo": echo, "Out_ref": host_path(),
                                         "Out_uint64": Uint64(2**64 - 1), "Out_null": None}

    class KeysProvider(prov.Provider):
        """Uses the default get_instance: key identity after the dispatcher's conversion."""
        namespace = VIRT
        classnames = (KEYS_CLASS,)

        def __init__(self):
            cls = ns.get(KEYS_CLASS)
            self.instances = []
            for i, k in enumerate(KEYS_INSTANCES):
                path = keys_path(*k)
                self.instances.append(prov.build_instance(
                    cls, {**path.keybindings, "Value": f"value-{i}"}, path))

        async def enumerate_instances(self, classname):
            return list(self.instances)

    provs = {"host": HostProvider(), "guests": GuestProvider(),
             "hosted": HostedDependencyProvider(), "alltypes": AllTypesProvider(),
             "keys": KeysProvider()}
    return provs


def _show(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return str(v)


def env_without_proxy(home: Path) -> dict[str, str]:
    """An environment for client subprocesses: private HOME, no proxies."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HOME"] = str(home)
    env["PYWBEMCLI_TERMWIDTH"] = "200"
    return env


PYTHON = sys.executable
