"""`serve` starts libvirt's open before it imports the rest of the server (issue 16,
start-up): the open of thousands of domains takes seconds without the GIL, and aiohttp,
the server's own modules and the class repository fit in them (server/main.py,
docs/architecture.md "Sources").

The order is seen from inside a real `cim-provider serve` process (cli.main in a fresh
interpreter with libvirt.open wrapped), never from the clock. The refusals still come
before libvirt is touched, and the server still serves what libvirt has and follows its
events (a private libvirtd: the remote driver adds its socket at open, so the event
implementation must be on the loop before the early open).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from cim_provider.providers.backend import HOST_CLASS

try:
    from tests.support import stop_process
    from tests.support import wbem_server as ws
    from tests.support.libvirtd import Libvirtd
    from tests.support.model import connect_wbem, domain_config, poll_until
except ImportError:  # tests/ itself on sys.path
    from support import stop_process  # type: ignore
    from support import wbem_server as ws  # type: ignore
    from support.libvirtd import Libvirtd  # type: ignore
    from support.model import connect_wbem, domain_config, poll_until  # type: ignore

pytestmark = pytest.mark.timeout(180)

NO_BUS = "unix:path=/nonexistent/cim-provider-test-bus"
HEAVY = ("asyncio", "uvloop", "aiohttp", "pywbem", "cim_provider.server.http",
         "cim_provider.wbem.dispatch", "cim_provider.providers")

# cli.main(["serve", ...]) with libvirt.open wrapped: at the first call it notes which
# heavy modules are there already and on which thread it runs, then holds the open
# until the server's HTTP module is being imported -- which `serve` does while libvirt
# opens, so the wait ends at once; a server that imported it only after the open would
# reach the bound instead. What was seen is printed as one JSON line at the end.
PROBE = r"""
import json, os, signal, sys, threading, time
import libvirt

HEAVY = %r
seen = {}
real_open = libvirt.open

def watched_open(uri=None):
    if "before" not in seen:
        seen["before"] = [m for m in HEAVY if m in sys.modules]
        seen["notify_socket"] = os.environ.get("NOTIFY_SOCKET")
        if os.environ.get("PROBE_STOP_AT_OPEN"):   # a stop asked for before the loop runs
            os.kill(os.getpid(), signal.SIGTERM)
            return real_open(uri)
        seen["main_thread"] = threading.current_thread() is threading.main_thread()
        bound = time.monotonic() + 60
        while "cim_provider.server.http" not in sys.modules and time.monotonic() < bound:
            time.sleep(0.01)
        seen["imported_while_open"] = "cim_provider.server.http" in sys.modules
    return real_open(uri)

libvirt.open = watched_open

# The host name, resolved beside the open: held until the open has begun (a resolver
# that answers late), noting whether the open began while it was still held.
from cim_provider.server import main as server_main

def held_fqdn(timeout=2.0):
    bound = time.monotonic() + 60
    while "before" not in seen and time.monotonic() < bound:
        time.sleep(0.01)
    seen.setdefault("open_while_naming", "before" in seen)
    return "probe-host.example.test"

server_main.host_fqdn = held_fqdn
from cim_provider import cli
try:
    code = cli.main(sys.argv[1:])
finally:
    print("PROBE " + json.dumps(seen), flush=True)
sys.exit(code)
""" % (HEAVY,)


def _env() -> dict[str, str]:
    """The checkout's cache directory (build/), as the other `serve` tests use."""
    return {k: v for k, v in os.environ.items() if k != "CIM_PROVIDER_CACHE_DIR"}


def _seen(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("PROBE "):])


def write_node(path: Path, names: list[str]) -> None:
    """A test-driver node file with these running domains."""
    from cim_provider.domain.domxml import config_to_domain_xml
    with path.open("w") as f:
        f.write("<node>\n<cpu><mhz>2000</mhz><model>x86_64</model><active>4</active>"
                "<nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>2</threads>"
                "</cpu>\n<memory>8388608</memory>\n")
        for name in names:
            f.write(config_to_domain_xml(domain_config(name, memory_kib=1024)) + "\n")
        f.write("</node>\n")


def domain_names(url: str) -> set[str]:
    return {str(i["ElementName"])
            for i in connect_wbem(url).EnumerateInstances("VIRT_ComputerSystem")}


def test_libvirt_opens_first_and_the_server_is_imported_meanwhile(tmp_path):
    names = [f"order-{i}" for i in range(5)]
    node = tmp_path / "node.xml"
    write_node(node, names)
    port = ws.free_port()
    log = (tmp_path / "serve.log").open("w")
    # systemd's notify socket: out of the environment before libvirt's open (its thread,
    # and what it may spawn, must neither see it nor race its removal).
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, "serve", "--listen", f"127.0.0.1:{port}",
         "--libvirt-uri", f"test://{node}", "--manager-bus", NO_BUS,
         "--state-dir", str(tmp_path / "state"), "--metrics-interval", "0"],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ws.ROOT),
        env={**_env(), "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert b"READY=1" in notify.recv(4096).split(b"\n")
        ws.wait_accepting(port, time.monotonic() + 120, proc)
        # It serves what the early open brought: one enumeration has every domain.
        assert domain_names(f"http://127.0.0.1:{port}") == set(names)
        # ... and names the host as the resolver answered once the open had begun.
        hosts = connect_wbem(f"http://127.0.0.1:{port}").EnumerateInstances(HOST_CLASS)
        assert [str(h["Name"]) for h in hosts] == ["probe-host.example.test"]
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
        log.close()
        notify.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
    seen = _seen(stdout)
    assert seen["before"] == [], "imported before libvirt's open started"
    assert seen["notify_socket"] is None, "NOTIFY_SOCKET still set when libvirt opened"
    assert seen["main_thread"] is False, "the open must not hold up the loop's thread"
    assert seen["imported_while_open"] is True, "the server was not imported during the open"
    assert seen["open_while_naming"] is True, "the open waited for the host name"


def test_a_stop_asked_for_before_the_loop_runs_stops_the_server_cleanly(tmp_path):
    """SIGTERM while libvirt's open is being started (before the event loop and its
    signal handlers): noted, and the server stops as for one that arrives later, with
    exit 0 (not killed by the signal)."""
    node = tmp_path / "node.xml"
    write_node(node, ["early-stop"])
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, "serve", "--listen", f"127.0.0.1:{ws.free_port()}",
             "--libvirt-uri", f"test://{node}", "--manager-bus", NO_BUS,
             "--state-dir", str(tmp_path / "state"), "--metrics-interval", "0"],
            stdout=subprocess.PIPE, stderr=err, text=True, timeout=120, cwd=str(ws.ROOT),
            env={**_env(), "PROBE_STOP_AT_OPEN": "1"})
    assert proc.returncode == 0, log.read_text()
    assert _seen(proc.stdout)["before"] == []


def test_a_missing_schema_is_said_first_and_libvirt_is_never_opened(tmp_path):
    empty = tmp_path / "cache"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "serve", "--listen", f"127.0.0.1:{ws.free_port()}",
         "--libvirt-uri", "test:///default", "--manager-bus", NO_BUS,
         "--state-dir", str(tmp_path / "state"), "--cache-dir", str(empty)],
        capture_output=True, text=True, timeout=120, cwd=str(ws.ROOT), env=_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"DMTF schema not found in {empty}"), \
        proc.stderr
    assert _seen(proc.stdout) == {}, "libvirt.open was called"


def test_the_option_constants_agree_with_their_owners():
    """security.py spells out three values so that the options import neither aiohttp nor
    pywbem; they must stay those of http.py, auth.py and wbem/pull.py."""
    from cim_provider.server import auth, http, security
    from cim_provider.wbem import pull
    assert security.ROLES == auth.ROLES
    assert security.MAX_CONTEXTS_PER_CLIENT == pull.MAX_CONTEXTS_PER_CLIENT
    assert http.HTTPLimits().max_body == security.DEFAULT_MAX_BODY


def test_the_options_import_nothing_heavy():
    """What cli.py imports to parse `serve`'s command line and what `serve` imports
    before libvirt's open, the schema check included, bring in neither aiohttp nor
    pywbem."""
    code = ("import sys; import cim_provider.cli, cim_provider.server.options, "
            "cim_provider.server.main; from cim_provider.schema_setup import schema_missing; "
            "schema_missing(None); "
            "print(' '.join(m for m in ('aiohttp', 'pywbem') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(ws.ROOT)).stdout
    assert out.strip() == ""


@pytest.fixture
def libvirtd():
    lvd = Libvirtd()          # `make setup` installs libvirtd: its absence is a failure
    lvd.start()
    try:
        yield lvd
    finally:
        lvd.cleanup()


def test_events_arrive_over_a_connection_opened_early(tmp_path, libvirtd):
    """The remote driver adds its socket to the event loop at open: a domain created and
    destroyed through another connection shows, which only events can tell the server
    (it reads everything only at connect)."""
    import libvirt

    from cim_provider.domain.domxml import config_to_domain_xml
    port = ws.free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(ws.CIM_PROVIDER), "serve", "--listen", f"127.0.0.1:{port}",
         "--libvirt-uri", libvirtd.uri, "--manager-bus", NO_BUS,
         "--state-dir", str(tmp_path / "state"), "--metrics-interval", "0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(ws.ROOT), env=_env())
    other = None
    try:
        ws.wait_accepting(port, time.monotonic() + 120, proc)
        url = f"http://127.0.0.1:{port}"
        poll_until(lambda: "test" in domain_names(url), within=60, what="test:///default read")
        other = libvirt.open(libvirtd.uri)
        name = f"order-{uuidlib.uuid4().hex[:6]}"
        dom = other.createXML(config_to_domain_xml(domain_config(name, memory_kib=1024)), 0)
        poll_until(lambda: name in domain_names(url), within=60, what="a started domain shown")
        dom.destroy()
        poll_until(lambda: name not in domain_names(url), within=60,
                   what="a destroyed domain gone")
    finally:
        if other is not None:
            other.close()
        stop_process(proc)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()


class _Conn:
    """What an early open brings, as far as these tests look: close()."""

    def __init__(self) -> None:
        import threading
        self.closed = threading.Event()

    def close(self) -> int:
        self.closed.set()
        return 0


def test_the_source_takes_the_early_open_with_its_timeout_and_closes_what_is_left():
    """LibvirtSource's first open takes the one `serve` started; one that comes after the
    source gave up waiting (--libvirt-timeout), or that it never took (stopped first),
    is closed when it arrives."""
    import asyncio
    import concurrent.futures

    from cim_provider.sources.libvirt import LibvirtSource
    from cim_provider.sources.libvirt_calls import LibvirtTimeout
    taken, late, untaken = _Conn(), _Conn(), _Conn()

    async def scenario() -> None:
        ready: concurrent.futures.Future = concurrent.futures.Future()
        ready.set_result(taken)
        src = LibvirtSource("test:///default", opening=ready)
        assert await src._open("test:///default") is taken
        assert src._opening is None                 # taken once: a reconnect opens anew

        slow: concurrent.futures.Future = concurrent.futures.Future()
        src = LibvirtSource("test:///default", call_timeout=0.05, opening=slow)
        with pytest.raises(LibvirtTimeout):
            await src._open("test:///default")
        slow.set_result(late)

        never: concurrent.futures.Future = concurrent.futures.Future()
        src = LibvirtSource("test:///default", opening=never)
        await src.stop()
        never.set_result(untaken)

    asyncio.run(scenario())
    assert late.closed.wait(30) and untaken.closed.wait(30)
    assert not taken.closed.is_set()


REFUSALS = [
    # (description, extra options, what makes the start refuse)
    ("no DMTF schema", ["--cache-dir", "{empty}"], "schema"),
    ("plain HTTP on a non-loopback address", ["--listen", "192.0.2.1:5988"], "security"),
]


@pytest.mark.parametrize("desc, extra, why", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_start_leaves_the_signal_handlers_as_they_were(tmp_path, desc, extra, why):
    """serve's steps before its event loop (server/main.py `_begin`) note a stop asked
    for meanwhile; refused, they put SIGINT's and SIGTERM's handlers back."""
    from cim_provider import cli
    from cim_provider.server import main as server_main
    (tmp_path / "empty").mkdir()
    args = cli.parse_args(["serve", "--libvirt-uri", "test:///default", "--manager-bus",
                           NO_BUS, "--state-dir", str(tmp_path / "state"),
                           *[e.format(empty=tmp_path / "empty") for e in extra]])
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert server_main._begin(args) == 2, why
    assert {sig: signal.getsignal(sig) for sig in before} == before
