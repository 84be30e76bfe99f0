"""The benchmark: thousands of domains, measured side by side in one run.

For each N: a private libvirtd (test driver) holds N/2 running domains; the
reference Manager (its own process, private bus) holds N/2 passive definitions plus
twins for a quarter of the running ones; `cim-provider serve` runs as in production.
Every figure is the median of several runs, and the floors and the peer are measured
in the same run:
- libvirt floor: listAllDomains(ACTIVE) + getAllDomainStats(STATE) from this process;
- Manager floor: one ListDomains call over D-Bus from this process;
- loopback floor: the same number of bytes as the response, over a loopback socket;
- HTTP floor: the same bytes as an HTTP answer from a trivial server process to the
  same raw client over keep-alive, timed in turn with the server (`paired`);
- peer: pywbem_mock's FakedWBEMConnection holding the same instances, in-process;
- loop stall: the worst lateness of a server's event loop (a 1 ms probe in its own
  process) while it parses a 16 MiB request and writes the N-instance response.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import pywbem  # noqa: E402

from cim_provider.busdaemon import PrivateBus  # noqa: E402
from cim_provider.domain.records import DomainConfig  # noqa: E402
from cim_provider.manager.store import SqliteStore  # noqa: E402
from cim_provider.domain.domxml import config_to_domain_xml  # noqa: E402
from tests.support.libvirtd import Libvirtd  # noqa: E402

EXE = str(ROOT / ".venv" / "bin" / "cim-provider")
NS = "root/virt"
RUNS = 5
SERVE_EXTRA: list[str] = []     # --serve-arg: more `cim-provider serve` options, every server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_time(fn, runs: int = RUNS) -> float:
    fn()                                   # warm-up (fills caches, like a console's 2nd poll)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --- raw CIM-XML requests -------------------------------------------------------------

def _envelope(method: str, params: str, intrinsic: bool = True) -> bytes:
    ns = "".join(f'<NAMESPACE NAME="{p}"/>' for p in NS.split("/"))
    return (f'<?xml version="1.0" encoding="utf-8"?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="1" PROTOCOLVERSION="1.0"><SIMPLEREQ><IMETHODCALL NAME="{method}">'
            f'<LOCALNAMESPACEPATH>{ns}</LOCALNAMESPACEPATH>{params}</IMETHODCALL>'
            f'</SIMPLEREQ></MESSAGE></CIM>').encode()


def _classname(name: str, value: str) -> str:
    return f'<IPARAMVALUE NAME="{name}"><CLASSNAME NAME="{value}"/></IPARAMVALUE>'


def _value(name: str, value: str) -> str:
    return f'<IPARAMVALUE NAME="{name}"><VALUE>{value}</VALUE></IPARAMVALUE>'


def _instancename(cls: str, keys: dict[str, str]) -> str:
    kb = "".join(f'<KEYBINDING NAME="{k}"><KEYVALUE VALUETYPE="string">{v}</KEYVALUE></KEYBINDING>'
                 for k, v in keys.items())
    return f'<INSTANCENAME CLASSNAME="{cls}">{kb}</INSTANCENAME>'


class RawClient:
    """One keep-alive connection speaking just enough HTTP/1.1 to time the server:
    the request is sent in one write and the response read by Content-Length, with
    no CIM-XML parsing, so client overhead stays in the tens of microseconds. The
    body is received straight into one reused buffer (as the loopback floor's reader
    receives, without gathering): `call` returns a memoryview of it, valid until the
    next call. (Gathering with `bytes +=` cost this client ~O(n²/64 KiB) copying:
    tens of milliseconds per 18 MB response, which the server's figure included.)"""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._have = 0                 # bytes of the next response already received

    def _grow(self, size: int) -> None:
        """A larger buffer (a new one: the caller may still hold a view of the old)."""
        buf = bytearray(max(size, 2 * len(self._buf)))
        buf[:self._have] = self._view[:self._have]
        self._buf, self._view = buf, memoryview(buf)

    def _recv(self) -> None:
        if self._have == len(self._buf):
            self._grow(self._have + 1)
        got = self.sock.recv_into(self._view[self._have:])
        if not got:
            raise RuntimeError("server closed the connection")
        self._have += got

    def call(self, method: str, body: bytes) -> memoryview:
        head = (f"POST /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f'Content-Type: application/xml; charset="utf-8"\r\n'
                f"Content-Length: {len(body)}\r\nCIMOperation: MethodCall\r\n"
                f"CIMMethod: {method}\r\nCIMObject: {NS}\r\nCIMProtocolVersion: 1.0\r\n\r\n")
        self.sock.sendall(head.encode() + body)
        end = -1
        while end < 0:
            end = self._buf.find(b"\r\n\r\n", 0, self._have)
            if end < 0:
                self._recv()
        header = bytes(self._view[:end])
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", header)
        if m is None:
            raise RuntimeError(f"{method}: no Content-Length in {header[:200]!r}")
        start = end + 4
        total = start + int(m.group(1))
        if total > len(self._buf):
            self._grow(total)
        while self._have < total:
            self._recv()
        data = self._view[start:total]
        extra = self._have - total                    # never expected: one call at a time
        if extra:
            rest = bytes(self._view[total:self._have])
            self._grow(len(self._buf))
            self._view[:extra] = rest
        self._have = extra
        if not header.startswith(b"HTTP/1.1 200") or b"<ERROR" in bytes(data[:2000]):
            raise RuntimeError(f"{method}: {header[:40]!r} {bytes(data[:300])!r}")
        return data


def pull_all(cli: RawClient, pages: list[int] | None = None) -> int:
    body = _envelope("OpenEnumerateInstances", _classname("ClassName", "VIRT_ComputerSystem")
                     + _value("MaxObjectCount", "1000"))
    data = cli.call("OpenEnumerateInstances", body)
    total = len(data)
    if pages is not None:
        pages.append(len(data))
    while True:
        # The output parameters close the response: look there, not through the
        # whole ~2 MB (scanning it cost this client ~2 ms per response).
        m = re.search(rb'NAME="EnumerationContext"[^>]*><VALUE>([^<]+)</VALUE>',
                      bytes(data[-4096:]))
        if m is None:
            return total
        ctx = m.group(1).decode()
        data = cli.call("PullInstancesWithPath",
                        _envelope("PullInstancesWithPath", _value("EnumerationContext", ctx)
                                  + _value("MaxObjectCount", "1000")))
        total += len(data)
        if pages is not None:
            pages.append(len(data))


def loopback_floor(nbytes: int) -> float:
    """Time to move `nbytes` through a loopback TCP connection (server already up)."""
    payload = b"x" * nbytes
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    go = threading.Event()

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            for _ in range(RUNS + 1):
                go.wait()
                go.clear()
                c.sendall(payload)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = socket.create_connection(("127.0.0.1", port))

    def once() -> None:
        go.set()
        got = 0
        while got < nbytes:
            chunk = cli.recv(1 << 20)
            if not chunk:
                raise RuntimeError("loopback closed")
            got += len(chunk)

    v = median_time(once)
    cli.close()
    srv.close()
    return v


# A trivial HTTP server (its own process, uvloop when installed): each request's body
# is a decimal size, answered with that many bytes, already made, in one writelines().
_CANNED = """
import asyncio, re, sys
try:
    import uvloop
    run = uvloop.run
except ImportError:
    run = asyncio.run
made = {}
class Canned(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\\r\\n\\r\\n")
            if end < 0:
                return
            m = re.search(rb"(?i)content-length:\\s*(\\d+)", self.buf[:end])
            stop = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < stop:
                return
            size, self.buf = int(self.buf[end + 4:stop]), self.buf[stop:]
            if size not in made:
                made[size] = (b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % size,
                              b"x" * size)
            self.transport.writelines(made[size])
async def main():
    server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
run(main())
"""


class HttpFloor:
    """The same bytes as a response, from a trivial HTTP server to a RawClient over
    keep-alive: what any server answering this client costs at least (the request's
    round trip and the response's bytes), measured the way the server is."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CANNED], stdout=subprocess.PIPE)
        self.cli = RawClient(int(self.proc.stdout.readline()))  # type: ignore[union-attr]

    def call(self, *sizes: int) -> None:
        for size in sizes:
            if len(self.cli.call("Floor", str(size).encode())) != size:
                raise RuntimeError("HTTP floor: short answer")

    def close(self) -> None:
        self.cli.sock.close()
        self.proc.kill()
        self.proc.wait()


PAIRED_RUNS = 11


def paired(server, floor, runs: int = PAIRED_RUNS) -> tuple[float, float]:
    """Median times of `server()` and `floor()`, called in turn (each once to warm up),
    so that both see the same moments of a shared machine."""
    server()
    floor()
    ours, theirs = [], []
    for _ in range(runs):
        t = time.perf_counter()
        server()
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        floor()
        theirs.append(time.perf_counter() - t)
    return statistics.median(ours), statistics.median(theirs)


def timed_with_floors(cli: RawClient, out: dict) -> dict[str, int]:
    """EnumerateInstances, EnumerateInstanceNames and the pull (1,000 per page) of
    VIRT_ComputerSystem: server time beside the HTTP floor of the same bytes (in turn),
    and the raw loopback floor. Returns the response sizes."""
    sizes: dict[str, int] = {}
    pages: list[int] = []
    sizes["Pull(1000)"] = pull_all(cli, pages)
    floor = HttpFloor()
    try:
        for label in ("EnumerateInstances", "EnumerateInstanceNames", "Pull(1000)"):
            if label == "Pull(1000)":
                def ours() -> None:
                    pull_all(cli)

                def theirs() -> None:
                    floor.call(*pages)
            else:
                body = _envelope(label, _classname("ClassName", "VIRT_ComputerSystem"))
                sizes[label] = len(cli.call(label, body))

                def ours() -> None:
                    cli.call(label, body)

                def theirs() -> None:
                    floor.call(sizes[label])
            out[f"server_{label}_s"], out[f"floor_http_{label}_s"] = paired(ours, theirs)
            out[f"floor_loopback_{label}_s"] = loopback_floor(sizes[label])
    finally:
        floor.close()
    return sizes


# --- set-up ---------------------------------------------------------------------------

def make_config(name: str, memory_kib: int = 65536) -> DomainConfig:
    return DomainConfig(uuid=str(uuidlib.uuid4()), name=name, type="Test", os_type="hvm",
                        arch="x86_64", vcpus=1, memory_kib=memory_kib, max_memory_kib=memory_kib)


class Setup:
    """libvirtd + Manager + server for one N; everything stopped by close()."""

    def __init__(self, n: int, workdir: Path):
        self.n = n
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.lvd = Libvirtd()
        self.lvd.start()
        self.conn = libvirt.open(self.lvd.uri)
        self.conn.lookupByName("test").destroy()          # only our domains run
        running = [make_config(f"run-{i:05d}", 1024) for i in range(n // 2)]
        for cfg in running:
            self.conn.createXML(config_to_domain_xml(cfg), 0)
        self.running = running
        passive = [make_config(f"passive-{i:05d}") for i in range(n - n // 2)]
        twins = [make_config(c.name) for c in running[: n // 8]]
        twins = [DomainConfig(**{**{f: getattr(t, f) for f in t.__slots__}, "uuid": r.uuid})
                 for t, r in zip(twins, running)]
        db = workdir / f"defs-{n}.db"
        store = SqliteStore(db)
        store.define_many(passive + twins)
        store.close()
        self.bus = PrivateBus()
        log = open(workdir / f"procs-{n}.log", "ab")
        self.procs.append(subprocess.Popen(
            [EXE, "manager", "--bus", self.bus.address, "--store", f"sqlite:{db}",
             "--libvirt-uri", self.lvd.uri, "--log-level", "WARNING"],
            stdout=log, stderr=log))
        self.port = free_port()
        self.server = subprocess.Popen(
            [EXE, "serve", "--listen", f"127.0.0.1:{self.port}", "--libvirt-uri", self.lvd.uri,
             "--manager-bus", self.bus.address, "--log-level", "WARNING", *SERVE_EXTRA],
            stdout=log, stderr=log)
        self.procs.append(self.server)
        self.wbem = pywbem.WBEMConnection(f"http://127.0.0.1:{self.port}", default_namespace=NS,
                                          timeout=600)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.wbem.EnumerateInstanceNames("VIRT_ComputerSystem")) == self.n:
                    return
            except (pywbem.Error, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not report {self.n} systems")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.bus.stop()
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
        self.lvd.cleanup()


# --- measurements ---------------------------------------------------------------------

def manager_floor(bus_address: str) -> float:
    from cim_provider.contract import BUS_NAME, INTERFACE, OBJECT_PATH
    from cim_provider.contract.bus import Message, connect

    async def measure() -> float:
        bus = await connect(bus_address)

        async def once() -> None:
            reply = await bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                           interface=INTERFACE, member="ListDomains"))
            if not reply.body:
                raise RuntimeError("empty ListDomains reply")

        await once()
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            await once()
            times.append(time.perf_counter() - t)
        bus.disconnect()
        return statistics.median(times)

    return asyncio.run(measure())


def libvirt_floor(conn) -> float:
    def once() -> None:
        doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        conn.domainListGetStats(doms, libvirt.VIR_DOMAIN_STATS_STATE) if doms else None
    return median_time(once)


def mock_peer(setup: Setup) -> dict[str, float]:
    """pywbem_mock holding the same VIRT_ComputerSystem instances, in-process."""
    import zipfile

    import pywbem_mock

    from cim_provider.wbem.repository import DEFAULT_MOF_DIR, DEFAULT_SCHEMA_ZIP
    conn = pywbem_mock.FakedWBEMConnection(default_namespace=NS)
    with tempfile.TemporaryDirectory(prefix="cim-schema-") as schema:
        with zipfile.ZipFile(DEFAULT_SCHEMA_ZIP) as z:
            z.extractall(schema)
        for q in ("qualifiers.mof", "qualifiers_optional.mof"):
            conn.compile_mof_file(os.path.join(schema, q), NS)
        conn.compile_mof_file(str(DEFAULT_MOF_DIR / "virt.mof"), NS, search_paths=[schema])
    insts = setup.wbem.EnumerateInstances("VIRT_ComputerSystem")
    conn.add_cimobjects(insts, namespace=NS)
    return {"conn": conn, "paths": [i.path for i in insts],
            "enumerate_s": median_time(lambda: conn.EnumerateInstances("VIRT_ComputerSystem"))}


def getinstance_latency(setup: Setup, peer: dict, blocks: int = 5,
                        per_block: int = 400) -> dict[str, float]:
    """GetInstance over one keep-alive connection and pywbem_mock's in-process
    GetInstance, in alternating blocks so both see the same machine load.

    The first call of each block follows the server's idle time during the other
    blocks (~100 ms): on this kind of machine a process woken after that long runs its
    first few hundred microseconds several times slower (a fixed Python loop measured
    3x slower there). Steady traffic has no such gaps, so the blocks are long (5 of
    400 calls: those 5 calls are 0.25% of the samples, where 10 blocks of 100 made
    them exactly the 1% that p99 looks at). The machine's floor for p99 / p50 is
    measured the same way, in the same run: a trivial uvloop server (bench/inprocess.py's
    echo: a fixed answer after ~60 µs of Python) gets its own block between ours and
    pywbem_mock's. `steady_p99_s` is our p99 without the first call of each block
    (reported beside, never instead)."""
    cli = RawClient(setup.port)
    rnd = random.Random(2)

    def body(c: DomainConfig) -> bytes:
        return _envelope("GetInstance", '<IPARAMVALUE NAME="InstanceName">' + _instancename(
            "VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem",
                                    "Name": c.uuid}) + "</IPARAMVALUE>")

    for c in setup.running[:50]:
        cli.call("GetInstance", body(c))
    echo = _Echo()
    ours, theirs, floor, steady = [], [], [], []
    try:
        for _ in range(50):
            echo.call()
        for _ in range(blocks):
            for i, b in enumerate([body(rnd.choice(setup.running)) for _ in range(per_block)]):
                t = time.perf_counter()
                cli.call("GetInstance", b)
                ours.append(time.perf_counter() - t)
                if i:
                    steady.append(ours[-1])
            for _ in range(per_block):
                t = time.perf_counter()
                echo.call()
                floor.append(time.perf_counter() - t)
            for p in [rnd.choice(peer["paths"]) for _ in range(per_block)]:
                t = time.perf_counter()
                peer["conn"].GetInstance(p)
                theirs.append(time.perf_counter() - t)
    finally:
        echo.close()
        cli.sock.close()

    for values in (ours, floor, steady):
        values.sort()

    def p99(values: list[float]) -> float:
        return values[int(len(values) * 0.99) - 1]

    return {"p50_s": ours[len(ours) // 2], "p99_s": p99(ours),
            "mock_p50_s": statistics.median(theirs),
            "floor_p50_s": floor[len(floor) // 2], "floor_p99_s": p99(floor),
            "steady_p99_s": p99(steady)}


class _Echo:
    """bench/inprocess.py's trivial uvloop server (a fixed 1,500-byte answer after ~60
    µs of Python) and a keep-alive connection to it."""

    def __init__(self) -> None:
        from bench.inprocess import _ECHO
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE)
        port = int(self.proc.stdout.readline())         # type: ignore[union-attr]
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = b"POST / HTTP/1.1\r\nContent-Length: 600\r\n\r\n" + b"y" * 600
        self.size = len(b"HTTP/1.1 200 OK\r\nContent-Length: 1500\r\n\r\n") + 1500

    def call(self) -> None:
        self.sock.sendall(self.request)
        got = 0
        while got < self.size:
            got += len(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


def getinstance_concurrent(setup: Setup, clients: int = 8, per_client: int = 250) -> float:
    """Requests per second with `clients` keep-alive connections at once."""
    ccn = {"CreationClassName": "VIRT_ComputerSystem"}
    bodies = [_envelope("GetInstance", f'<IPARAMVALUE NAME="InstanceName">'
                        f'{_instancename("VIRT_ComputerSystem", {**ccn, "Name": c.uuid})}'
                        "</IPARAMVALUE>") for c in setup.running[:per_client]]
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            cli = RawClient(setup.port)
            cli.call("GetInstance", bodies[0])
            barrier.wait()
            for b in bodies:
                cli.call("GetInstance", b)
        except BaseException as exc:  # reported after the run
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return clients * len(bodies) / elapsed


def freshness(setup: Setup, rounds: int = 5) -> float:
    """libvirt suspend/resume (from another connection) -> a client sees the new state."""
    cfg = setup.running[0]
    dom = setup.conn.lookupByUUIDString(cfg.uuid)
    path = pywbem.CIMInstanceName("VIRT_ComputerSystem", {
        "CreationClassName": "VIRT_ComputerSystem", "Name": cfg.uuid}, namespace=NS)
    samples = []
    for i in range(rounds * 2):
        want = 9 if i % 2 == 0 else 2
        t = time.perf_counter()
        (dom.suspend if want == 9 else dom.resume)()
        while setup.wbem.GetInstance(path, PropertyList=["EnabledState"])["EnabledState"] != want:
            if time.perf_counter() - t > 10:
                raise TimeoutError("state change not visible within 10 s")
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


# --- loop stall -----------------------------------------------------------------------

STALL_BODY = 16 * 1024 * 1024


def stall_request(size: int = STALL_BODY) -> bytes:
    """A valid CIM-XML EnumerateInstanceNames of `size` bytes made of many small
    IPARAMVALUEs: the costliest shape to parse per byte (elements, not text), and one
    the dispatcher answers at once (CIM_ERR_INVALID_PARAMETER at the first unknown
    parameter), so what stalls the loop is the parse alone."""
    base = _envelope("EnumerateInstanceNames", _classname("ClassName", "VIRT_HostSystem") + "@@")
    item = '<IPARAMVALUE NAME="Pad%07d"><VALUE>padding</VALUE></IPARAMVALUE>'
    count = (size - len(base) + 2) // len(item % 0)
    return base.replace(b"@@", "".join(item % i for i in range(count)).encode())


_STALL_CHILD = """
import sys
from bench.run import stall_server
stall_server(sys.argv[1], sys.argv[2])
"""


def stall_server(libvirt_uri: str, manager_bus: str) -> None:
    """A child process: `serve`'s own wiring (start_sources + start_server, uvloop when
    installed) on loopback, plus a probe task that sleeps 1 ms at a time and keeps the
    worst lateness. Prints `port P`; then answers `reset` with `ok` and `read` with the
    worst lateness in ms since the last reset (read on the loop itself, after the
    probe has woken up from whatever stalled it)."""
    from cim_provider.server.main import run_loop, start_server, start_sources

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sources = await start_sources(libvirt_uri=libvirt_uri, manager_bus=manager_bus)
        handle = await start_server([("127.0.0.1", 0)], sources=sources)
        gc.freeze()                    # as `serve` does once started (server/main.py)
        worst = [0.0]

        async def probe() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                worst[0] = max(worst[0], time.perf_counter() - t - 0.001)

        async def command(line: str) -> str:
            if line == "reset":
                await asyncio.sleep(0.01)
                worst[0] = 0.0
                return "ok"
            await asyncio.sleep(0.01)          # the probe records a stall once it is over
            return f"{worst[0] * 1e3:.3f}"

        done = asyncio.Event()

        def commands() -> None:                # blocked in read(): holds no GIL
            for line in sys.stdin:
                reply = asyncio.run_coroutine_threadsafe(command(line.strip()), loop).result()
                print(reply, flush=True)
            loop.call_soon_threadsafe(done.set)

        task = asyncio.create_task(probe())
        print(f"port {handle.addresses[0][1]}", flush=True)
        threading.Thread(target=commands, daemon=True).start()
        await done.wait()
        task.cancel()
        await handle.close()

    run_loop(main())


def loop_stall(setup: Setup, runs: int = 3) -> dict[str, float]:
    """Worst lateness (ms) of the server's event loop while it parses a 16 MiB request
    and while it writes the N-instance EnumerateInstances response, each the median
    over `runs` of the worst lateness seen by a 1 ms probe in the server process (a
    second server on the same libvirtd and Manager: `serve` has no probe)."""
    log = open(setup.workdir / f"stall-{setup.n}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-c", _STALL_CHILD, setup.lvd.uri, setup.bus.address],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            cwd=str(ROOT), text=True, bufsize=1)
    try:
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"stall server did not start: {line!r}")
        port = int(line.split()[1])

        def ask(cmd: str) -> str:
            proc.stdin.write(cmd + "\n")
            return proc.stdout.readline().strip()

        wbem = pywbem.WBEMConnection(f"http://127.0.0.1:{port}", default_namespace=NS,
                                     timeout=600)
        deadline = time.monotonic() + 300
        while len(wbem.EnumerateInstanceNames("VIRT_ComputerSystem")) != setup.n:
            if time.monotonic() > deadline:
                raise TimeoutError("stall server did not report all systems")
            time.sleep(0.2)
        cli = RawClient(port)
        big = stall_request()
        ei = _envelope("EnumerateInstances", _classname("ClassName", "VIRT_ComputerSystem"))
        cli.call("EnumerateInstances", ei)     # warm-up, as for the other figures
        out: dict[str, float] = {}
        for label, method, body in (("request", "EnumerateInstanceNames", big),
                                    ("response", "EnumerateInstances", ei)):
            worst = []
            for _ in range(runs):
                ask("reset")
                try:
                    cli.call(method, body)
                except RuntimeError as exc:    # the padded request: INVALID_PARAMETER
                    if 'ERROR CODE="4"' not in str(exc):
                        raise
                worst.append(float(ask("read")))
            out[f"loop_stall_{label}_ms"] = statistics.median(worst)
        out["loop_stall_ms"] = max(out["loop_stall_request_ms"], out["loop_stall_response_ms"])
        out["loop_stall_request_bytes"] = len(big)
        return out
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def measure(n: int, workdir: Path) -> dict:
    print(f"--- N = {n}: setting up", flush=True)
    t0 = time.perf_counter()
    setup = Setup(n, workdir)
    out: dict = {"n": n, "setup_s": time.perf_counter() - t0}
    try:
        cli = RawClient(setup.port)
        host = setup.wbem.EnumerateInstanceNames("VIRT_HostSystem")[0]
        ops = {
            "EnumerateInstances": ("EnumerateInstances", _envelope(
                "EnumerateInstances", _classname("ClassName", "VIRT_ComputerSystem"))),
            "EnumerateInstanceNames": ("EnumerateInstanceNames", _envelope(
                "EnumerateInstanceNames", _classname("ClassName", "VIRT_ComputerSystem"))),
            "Associators(host)": ("Associators", _envelope("Associators",
                '<IPARAMVALUE NAME="ObjectName">'
                + _instancename("VIRT_HostSystem", dict(host.keybindings)) + "</IPARAMVALUE>"
                + _classname("AssocClass", "VIRT_HostedDependency"))),
        }
        sizes = timed_with_floors(cli, out)
        for label, (method, body) in ops.items():
            if label not in sizes:
                sizes[label] = len(cli.call(method, body))
                out[f"server_{label}_s"] = median_time(lambda: cli.call(method, body))
        out["bytes"] = sizes
        out["e2e_pywbem_EnumerateInstances_s"] = median_time(
            lambda: setup.wbem.EnumerateInstances("VIRT_ComputerSystem"))
        out["e2e_pywbem_Pull(1000)_s"] = median_time(
            lambda: setup.wbem.IterEnumerateInstances("VIRT_ComputerSystem",
                                                      MaxObjectCount=1000).__iter__()
            and list(setup.wbem.IterEnumerateInstances("VIRT_ComputerSystem",
                                                       MaxObjectCount=1000)))
        out["floor_libvirt_s"] = libvirt_floor(setup.conn)
        out["floor_manager_s"] = manager_floor(setup.bus.address)
        out["floor_EnumerateInstances_s"] = (out["floor_libvirt_s"] + out["floor_manager_s"]
                                             + out["floor_loopback_EnumerateInstances_s"])
        peer = mock_peer(setup)
        out["mock_EnumerateInstances_s"] = peer["enumerate_s"]
        gi = getinstance_latency(setup, peer)
        out["getinstance_p50_s"], out["getinstance_p99_s"] = gi["p50_s"], gi["p99_s"]
        out["mock_getinstance_p50_s"] = gi["mock_p50_s"]
        out.update({f"getinstance_{k}": gi[k] for k in ("floor_p50_s", "floor_p99_s",
                                                        "steady_p99_s")})
        del peer
        out["getinstance_8conn_rps"] = getinstance_concurrent(setup)
        out["freshness_s"] = freshness(setup)
        out.update(loop_stall(setup))
        out["rss_mib"] = setup.rss_mib()
    finally:
        setup.close()
    return out


def report(results: list[dict]) -> str:
    lines = []
    hdr = f"{'N':>6} {'ei ms':>8} {'µs/inst':>8} {'floor ms':>9} {'x floor':>8} {'mock ms':>9} " \
          f"{'x mock':>7} {'ein ms':>8} {'assoc ms':>9} {'pull ms':>8} {'pywbem ms':>10} " \
          f"{'gi p50 µs':>10} {'gi p99 µs':>10} {'mock gi µs':>10} {'8c req/s':>9} " \
          f"{'fresh ms':>9} {'RSS MiB':>8}"
    lines.append(hdr)
    for r in results:
        n = r["n"]
        ei = r["server_EnumerateInstances_s"]
        lines.append(
            f"{n:>6} {ei * 1e3:>8.1f} {ei / n * 1e6:>8.2f} {r['floor_EnumerateInstances_s'] * 1e3:>9.1f} "
            f"{ei / r['floor_EnumerateInstances_s']:>8.2f} {r['mock_EnumerateInstances_s'] * 1e3:>9.1f} "
            f"{r['mock_EnumerateInstances_s'] / ei:>7.1f} {r['server_EnumerateInstanceNames_s'] * 1e3:>8.1f} "
            f"{r['server_Associators(host)_s'] * 1e3:>9.1f} {r['server_Pull(1000)_s'] * 1e3:>8.1f} "
            f"{r['e2e_pywbem_EnumerateInstances_s'] * 1e3:>10.1f} "
            f"{r['getinstance_p50_s'] * 1e6:>10.0f} {r['getinstance_p99_s'] * 1e6:>10.0f} "
            f"{r['mock_getinstance_p50_s'] * 1e6:>10.0f} {r['getinstance_8conn_rps']:>9.0f} "
            f"{r['freshness_s'] * 1e3:>9.1f} {r['rss_mib']:>8.1f}")
    lines.append("")
    lines.append("floor = libvirt (list + states) + Manager (ListDomains) + the same bytes over "
                 "loopback; x mock = how many times faster than pywbem_mock in-process.")
    for r in results:
        lines.append(f"N={r['n']}: floors libvirt {r['floor_libvirt_s'] * 1e3:.1f} ms, Manager "
                     f"{r['floor_manager_s'] * 1e3:.1f} ms, loopback "
                     f"{r['floor_loopback_EnumerateInstances_s'] * 1e3:.1f} ms for "
                     f"{r['bytes']['EnumerateInstances']} bytes")
    for r in results:
        if "loop_stall_ms" in r:
            lines.append(f"N={r['n']}: loop stall {r['loop_stall_ms']:.1f} ms worst lateness "
                         f"(parsing a {r['loop_stall_request_bytes'] / 2**20:.0f} MiB request "
                         f"{r['loop_stall_request_ms']:.1f} ms, writing {r['n']} instances "
                         f"{r['loop_stall_response_ms']:.1f} ms)")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        lines.append(f"GetInstance p50 at N={b['n']} vs N={a['n']}: "
                     f"{b['getinstance_p50_s'] / a['getinstance_p50_s']:.2f}x")
    lines += issue16_lines(results)
    return "\n".join(lines)


def issue16_lines(results: list[dict]) -> list[str]:
    """Issue 16's ratios: server time over the same bytes over loopback, GetInstance
    against pywbem_mock and its own p50, RSS per domain over the empty server."""
    lines = ["", "server time / the same bytes over loopback: from a trivial HTTP server to "
             f"the same raw client, keep-alive, timed in turn, median of {PAIRED_RUNS} (in "
             "brackets: over a bare socket, median of "
             f"{RUNS}); GetInstance p50 / pywbem_mock's, p99 / p50; RSS above the empty server:"]
    for r in results:
        parts = []
        for label in ("EnumerateInstances", "EnumerateInstanceNames", "Pull(1000)"):
            parts.append(floor_ratios(r, label))
        parts.append(f"GetInstance {r['getinstance_p50_s'] / r['mock_getinstance_p50_s']:.2f}x "
                     f"mock, p99 {r['getinstance_p99_s'] / r['getinstance_p50_s']:.2f}x p50")
        if "getinstance_floor_p99_s" in r:
            parts.append(f"(machine floor timed the same way: p99 "
                         f"{r['getinstance_floor_p99_s'] / r['getinstance_floor_p50_s']:.2f}x "
                         f"p50, p50 {r['getinstance_floor_p50_s'] * 1e6:.0f} µs, p99 "
                         f"{r['getinstance_floor_p99_s'] * 1e6:.0f} µs against our "
                         f"{r['getinstance_p99_s'] * 1e6:.0f} µs; without each block's first "
                         f"call: p99 "
                         f"{r['getinstance_steady_p99_s'] / r['getinstance_p50_s']:.2f}x p50)")
        if r.get("baseline_rss_mib") is not None and r["n"]:
            parts.append(f"RSS {(r['rss_mib'] - r['baseline_rss_mib']) * 1024 / r['n']:.1f} "
                         "KiB/domain")
        lines.append(f"N={r['n']}: " + ", ".join(parts))
    return lines


def floor_ratios(r: dict, label: str) -> str:
    """`label`'s server time over its HTTP floor, and over the bare socket's."""
    ours = r[f"server_{label}_s"]
    text = f"{label} {ours / r[f'floor_http_{label}_s']:.2f}x" \
        if f"floor_http_{label}_s" in r else label
    return text + f" ({ours / r[f'floor_loopback_{label}_s']:.2f}x)"


def plot(results: list[dict], path: Path, inproc: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(ns, [r["server_EnumerateInstances_s"] * 1e3 for r in results], "o-",
            label="cim-provider EnumerateInstances (server, raw HTTP)")
    ax.plot(ns, [r["e2e_pywbem_EnumerateInstances_s"] * 1e3 for r in results], "o--",
            label="cim-provider EnumerateInstances (pywbem end to end)")
    ax.plot(ns, [r["floor_EnumerateInstances_s"] * 1e3 for r in results], "s-",
            label="floor: libvirt + Manager + loopback bytes")
    ax.plot(ns, [r["mock_EnumerateInstances_s"] * 1e3 for r in results], "^-",
            label="pywbem_mock EnumerateInstances (in-process)")
    ax.plot(ns, [r["getinstance_p50_s"] * 1e3 for r in results], "o-",
            label="cim-provider GetInstance p50 (HTTP)")
    ax.plot(ns, [r["mock_getinstance_p50_s"] * 1e3 for r in results], "^--",
            label="pywbem_mock GetInstance (in-process)")
    ax.plot(ns, [r["floor_loopback_EnumerateInstances_s"] * 1e3 for r in results], "s:",
            label="floor: EnumerateInstances' bytes over loopback")
    if all("floor_loopback_EnumerateInstanceNames_s" in r for r in results):
        ax.plot(ns, [r["server_EnumerateInstanceNames_s"] * 1e3 for r in results], "o-",
                label="cim-provider EnumerateInstanceNames (server, raw HTTP)")
        ax.plot(ns, [r["floor_loopback_EnumerateInstanceNames_s"] * 1e3 for r in results], "s:",
                label="floor: EnumerateInstanceNames' bytes over loopback")
    if inproc is not None:
        ax.plot([inproc["n"]], [inproc["server_EnumerateInstances_s"] * 1e3], "D",
                label="in-process test driver: EnumerateInstances")
        ax.plot([inproc["n"]], [inproc["getinstance_p50_s"] * 1e3], "D",
                label="in-process test driver: GetInstance p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("domains (N)")
    ax.set_ylabel("time (ms)")
    ax.set_title("VIRT_ComputerSystem: latency against N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, action="append", help="N values (default 100 1000 10000)")
    ap.add_argument("--skip-farm", action="store_true",
                    help="leave out the farm benchmark (bench/farm.py: PostgreSQL, 100,000)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="OPTION",
                    help="an option for every `cim-provider serve` measured, repeatable "
                         "(e.g. --serve-arg=--metrics-interval=0)")
    ap.add_argument("--skip-inprocess", action="store_true",
                    help="leave out the in-process test-driver configuration and the empty "
                         "server's RSS (bench/inprocess.py)")


def writer_vs_tocimxml(count: int = 10_000) -> dict[str, float]:
    """Server-side serialization of `count` 15-property instances, side by side:
    the project's writer against pywbem's tocimxml() (issue 2's figure)."""
    from cim_provider.wbem import writer as w
    props = {"CreationClassName": "VIRT_ComputerSystem", "ElementName": "guest <&> \"x\"",
             "Caption": "A guest", "Description": "Virtual system guest: running",
             "NameFormat": "Other", "EnabledState": pywbem.Uint16(2),
             "RequestedState": pywbem.Uint16(12), "EnabledDefault": pywbem.Uint16(2),
             "OperationalStatus": [pywbem.Uint16(2)], "HealthState": pywbem.Uint16(5),
             "OtherIdentifyingInfo": ["uuid"], "IdentifyingDescriptions": ["UUID"],
             "Dedicated": [pywbem.Uint16(0)], "PrimaryStatus": pywbem.Uint16(1)}
    insts = []
    for i in range(count):
        u = str(uuidlib.UUID(int=i))
        path = pywbem.CIMInstanceName("VIRT_ComputerSystem", {
            "CreationClassName": "VIRT_ComputerSystem", "Name": u}, namespace=NS)
        insts.append(pywbem.CIMInstance("VIRT_ComputerSystem", {**props, "Name": u}, path=path))
    t = time.perf_counter()
    ours = "".join(w.value_namedinstance_xml(i) for i in insts)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = "".join(i.tocimxml().toxml() for i in insts)
    t_theirs = time.perf_counter() - t
    return {"count": count, "ours_s": t_ours, "tocimxml_s": t_theirs,
            "ours_bytes": len(ours), "tocimxml_bytes": len(theirs)}


def devices_and_metrics(n: int = 10_000) -> dict:
    """EnumerateInstances of VIRT_LogicalDisk and VIRT_BaseMetricValue next to
    VIRT_ComputerSystem at `n` running domains (bench/devices.py); prints its figures."""
    from bench.devices import measure_devices_and_metrics, report as devices_report
    figures = measure_devices_and_metrics(n, _envelope, _classname, median_time)
    print("\n" + devices_report(figures), flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def compile_bytecode() -> None:
    """The servers measured run from this checkout (an editable install): its modules'
    bytecode is compiled first, as `pip install` does for an installed cim-provider.
    Python reads cached bytecode even where PYTHONDONTWRITEBYTECODE stops it from
    writing any, and without it every start compiles each module again (~20 ms before
    libvirt's open alone)."""
    import compileall
    compileall.compile_dir(str(ROOT / "cim_provider"), quiet=1)


def run(args: argparse.Namespace) -> int:
    ns = args.n or [100, 1000, 10000]
    compile_bytecode()
    SERVE_EXTRA[:] = getattr(args, "serve_arg", [])
    results = []
    inproc = None
    with tempfile.TemporaryDirectory(prefix="cim-bench-") as tmp:
        for n in ns:
            results.append(measure(n, Path(tmp)))
            print(report(results[-1:]).splitlines()[1], flush=True)
        if not args.skip_inprocess:
            from bench import inprocess
            base = inprocess.baseline_rss(Path(tmp))
            for r in results:
                r["baseline_rss_mib"] = base
            inproc = inprocess.measure_inprocess(max(ns), Path(tmp))
            inproc["smaller"] = [inprocess.getinstance_at(n, Path(tmp))
                                 for n in sorted(ns) if n != max(ns)]
    text = report(results)
    print()
    print(text)
    if inproc is not None:
        from bench.inprocess import report as inprocess_report
        print("\n" + inprocess_report(inproc), flush=True)
        from bench.inprocess import report_getinstance
        for small in inproc.get("smaller", []):
            print(report_getinstance(small), flush=True)
    devices_and_metrics(max(ns))
    wr = writer_vs_tocimxml()
    print(f"\nCIM-XML for {wr['count']} instances of 15 properties: our writer "
          f"{wr['ours_s'] * 1e3:.0f} ms ({wr['ours_s'] / wr['count'] * 1e6:.1f} µs each), "
          f"pywbem tocimxml() {wr['tocimxml_s'] * 1e3:.0f} ms "
          f"({wr['tocimxml_s'] / wr['count'] * 1e6:.1f} µs each): "
          f"{wr['tocimxml_s'] / wr['ours_s']:.1f}x")
    out_dir = ROOT / "bench"
    (out_dir / "results.json").write_text(json.dumps({"runs": results, "writer": wr,
                                                      "inprocess": inproc}, indent=2))
    try:
        plot(results, out_dir / "latency.png", inproc)
        print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'latency.png'}")
    except ImportError:
        print(f"\nwrote {out_dir / 'results.json'} (matplotlib missing: no plot)")
    if not args.skip_farm:
        from bench.farm import farm_bench
        print("\nfarm (PostgreSQL, two hosts, 100,000 definitions):", flush=True)
        farm_bench(out_dir)
    return 0
