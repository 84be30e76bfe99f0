"""Issue 16's figures beside bench/run.py's: the in-process configuration, the empty
server's RSS, start-up.

In-process configuration: `cim-provider serve` with libvirt's test driver inside the
server process (`test:///PATH/node.xml` holding N running domains) and a private bus
with no Manager on it. Measured side by side in one run, as in run.py:
- start-up: spawn -> the first EnumerateInstances that returns all N systems, beside
  libvirt's own time to open the same node.xml and list its domains (a fresh process,
  likewise timed from its spawn to the list printed);
- EnumerateInstances, EnumerateInstanceNames and a pull in pages of 1,000 (raw HTTP,
  keep-alive, median of 5), each beside the same bytes over loopback;
- GetInstance p50 / p99 against pywbem_mock's in-process GetInstance (alternating
  blocks, as run.getinstance_latency), and GetInstance without a pause for
  SAMPLE_SECONDS, long enough to cover one metrics sample (--metrics-interval, 10 s);
- RSS, and the event loop's worst lateness (run.loop_stall's probe) while it parses a
  16 MiB request, writes the N-instance response, and serves GetInstance through a
  metrics sample.
The empty server (no domains, the same workload) gives the RSS baseline per domain, for
this configuration and for run.py's (libvirtd + Manager). At the smaller sizes
(`python -m bench.inprocess 100 1000 10000`, and run.py's N values) only GetInstance is
measured, the same two ways.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from types import SimpleNamespace

import pywbem

from bench.run import (EXE, NS, ROOT, SERVE_EXTRA, RawClient, Setup, _classname, _envelope,
                       _instancename, compile_bytecode, free_port, getinstance_latency,
                       loop_stall, mock_peer, pull_all, timed_with_floors)
from cim_provider.busdaemon import PrivateBus
from cim_provider.domain.domxml import config_to_domain_xml
from cim_provider.domain.records import DomainConfig

SAMPLE_SECONDS = 12.0
NO_METRICS = ("--metrics-interval", "0")


def write_node(path: Path, n: int) -> list[DomainConfig]:
    """A test-driver node.xml with `n` running domains."""
    configs = [DomainConfig(uuid=str(uuidlib.UUID(int=0xBE0C0000000000000000000000000000 + i)),
                            name=f"node-{i:05d}", type="Test", os_type="hvm", arch="x86_64",
                            vcpus=1, memory_kib=1024, max_memory_kib=1024) for i in range(n)]
    with open(path, "w") as f:
        f.write("<node>\n<cpu><mhz>2000</mhz><model>x86_64</model><active>64</active>"
                "<nodes>1</nodes><sockets>4</sockets><cores>8</cores><threads>2</threads></cpu>\n"
                "<memory>1073741824</memory>\n")
        for cfg in configs:
            f.write(config_to_domain_xml(cfg) + "\n")
        f.write("</node>\n")
    return configs


_LIST = """
import sys, time
t = time.perf_counter()
import libvirt
c = libvirt.open(sys.argv[1])
d = c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
print(time.perf_counter() - t, len(d), flush=True)
"""


def libvirt_list(uri: str) -> tuple[float, float]:
    """libvirt's own time to open `uri` and list its running domains in a fresh
    process: (from the spawn to the list printed, the same measured inside the process
    after the interpreter started). The first is the start-up's floor: both are timed
    from the spawn, each with its own interpreter start."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _LIST, uri], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    from_spawn = time.perf_counter() - t0
    child.communicate()
    if child.returncode != 0 or not line:
        raise RuntimeError(f"listing {uri} failed (exit {child.returncode})")
    return from_spawn, float(line.split()[0])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _count(data) -> int:
    return bytes(data).count(b"<VALUE.NAMEDINSTANCE>")


class Served:
    """`cim-provider serve` on a test:/// node file and a private bus without a Manager;
    start-up timed from spawn to the first EnumerateInstances with all `n` systems."""

    def __init__(self, uri: str, n: int, workdir: Path, configs: list[DomainConfig],
                 extra: tuple[str, ...] = ()):
        self.n, self.uri, self.workdir, self.running = n, uri, workdir, configs
        self.bus = PrivateBus()
        self.port = free_port()
        self.log = open(workdir / f"inprocess-{n}.log", "ab")
        ei = _envelope("EnumerateInstances", _classname("ClassName", "VIRT_ComputerSystem"))
        t0 = time.perf_counter()
        self.server = subprocess.Popen(
            [EXE, "serve", "--listen", f"127.0.0.1:{self.port}", "--libvirt-uri", uri,
             "--manager-bus", self.bus.address, "--log-level", "WARNING", *SERVE_EXTRA, *extra],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 300
        while True:
            if time.monotonic() > deadline or self.server.poll() is not None:
                raise RuntimeError(f"in-process server for {n} domains did not come up")
            try:
                cli = RawClient(self.port)
                if _count(cli.call("EnumerateInstances", ei)) == n:
                    break
                cli.sock.close()
            except (OSError, RuntimeError):
                pass
            time.sleep(0.005)            # start-up timed to within 5 ms
        self.startup_s = time.perf_counter() - t0
        self.cli = cli
        self.wbem = pywbem.WBEMConnection(f"http://127.0.0.1:{self.port}", default_namespace=NS,
                                          timeout=600)
        # what run.loop_stall expects of a Setup
        self.lvd = SimpleNamespace(uri=uri)

    def rss_mib(self) -> float:
        return _rss_mib(self.server.pid)

    def close(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.bus.stop()
        self.log.close()


def _workload(cli: RawClient) -> dict[str, int]:
    """What the figures ask of a server (the RSS baseline runs it too): returns the
    response sizes."""
    sizes = {}
    for label in ("EnumerateInstances", "EnumerateInstanceNames"):
        body = _envelope(label, _classname("ClassName", "VIRT_ComputerSystem"))
        sizes[label] = len(cli.call(label, body))
    sizes["Pull(1000)"] = pull_all(cli)
    return sizes


def getinstance_through_sample(port: int, configs: list[DomainConfig],
                               seconds: float = SAMPLE_SECONDS) -> dict[str, float]:
    """GetInstance without a pause for `seconds` (a metrics sample falls in it)."""
    cli = RawClient(port)
    bodies = [_envelope("GetInstance", '<IPARAMVALUE NAME="InstanceName">' + _instancename(
        "VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem", "Name": c.uuid})
        + "</IPARAMVALUE>") for c in configs[:200]]
    times = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t = time.perf_counter()
        cli.call("GetInstance", bodies[i % len(bodies)])
        times.append(time.perf_counter() - t)
        i += 1
    times.sort()
    cli.sock.close()
    return {"p50_s": times[len(times) // 2], "p99_s": times[int(len(times) * 0.99) - 1],
            "max_s": times[-1], "count": len(times)}


# libvirt's own open of 10,000 test domains alone varies by 1-2 s between runs here (one
# run in four or five takes 1.5 s longer, in our server as in the list): 7 pairs, each
# second one in the other order, so that a slow spell of the machine falls on either side.
STARTUP_PAIRS = 7


def startup_in_turn(uri: str, n: int, workdir: Path, configs: list[DomainConfig],
                    out: dict) -> Served:
    """Start-up timed in turn with libvirt's own open and list, STARTUP_PAIRS times
    (both vary by a second from run to run on a shared machine, together): fills
    `out` with the medians, each pair's difference and its median. Returns the last
    server, left running for the other figures."""
    lists: list[float] = []
    inside: list[float] = []
    starts: list[float] = []

    def listed() -> None:
        from_spawn, in_child = libvirt_list(uri)
        lists.append(from_spawn)
        inside.append(in_child)

    for i in range(STARTUP_PAIRS):
        if i % 2 == 0:
            listed()
        served = Served(uri, n, workdir, configs)
        starts.append(served.startup_s)
        if i < STARTUP_PAIRS - 1:
            served.close()           # the last one stays for the other figures
        if i % 2 == 1:
            listed()
    over = [s - li for s, li in zip(starts, lists)]
    out.update({"floor_libvirt_list_s": statistics.median(lists),
                "startup_s": statistics.median(starts),
                "startup_over_list_s": statistics.median(over),
                "startup_runs_s": starts, "libvirt_list_runs_s": lists,
                "libvirt_list_inside_runs_s": inside})
    return served


def measure_inprocess(n: int, workdir: Path) -> dict:
    print(f"--- in-process test driver, N = {n}: setting up", flush=True)
    node = workdir / f"node-{n}.xml"
    configs = write_node(node, n)
    uri = f"test://{node}"
    out: dict = {"n": n}
    served = startup_in_turn(uri, n, workdir, configs, out)
    try:
        cli = served.cli
        out["bytes"] = timed_with_floors(cli, out)
        peer = mock_peer(served)      # type: ignore[arg-type]  # duck-typed Setup
        out["mock_EnumerateInstances_s"] = peer["enumerate_s"]
        gi = getinstance_latency(served, peer)      # type: ignore[arg-type]
        del peer
        out["getinstance_p50_s"], out["getinstance_p99_s"] = gi["p50_s"], gi["p99_s"]
        out["mock_getinstance_p50_s"] = gi["mock_p50_s"]
        through = getinstance_through_sample(served.port, configs)
        out.update({f"getinstance_sample_{k}": v for k, v in through.items()})
        out["rss_mib"] = served.rss_mib()
        out.update({f"echo_floor_{k}": v for k, v in echo_floor().items()})
    finally:
        served.close()
    stall = SimpleNamespace(workdir=workdir, n=n, lvd=SimpleNamespace(uri=uri),
                            bus=PrivateBus())
    try:
        out.update(loop_stall(stall))        # type: ignore[arg-type]
    finally:
        stall.bus.stop()
    empty = workdir / "node-0.xml"
    write_node(empty, 0)
    for label, extra in (("", ()), ("nometrics_", NO_METRICS)):
        base = Served(f"test://{empty}", 0, workdir, [], extra)
        try:
            _workload(base.cli)
            out[f"{label}baseline_rss_mib"] = base.rss_mib()
        finally:
            base.close()
    # The same server without metrics sampling (--metrics-interval 0): what the
    # sampling costs in memory and in GetInstance latency.
    quiet = Served(uri, n, workdir, configs, NO_METRICS)
    try:
        _workload(quiet.cli)
        through = getinstance_through_sample(quiet.port, configs)
        out.update({f"nometrics_getinstance_sample_{k}": v for k, v in through.items()})
        out["nometrics_rss_mib"] = quiet.rss_mib()
    finally:
        quiet.close()
    out["libvirt_rss_mib"] = libvirt_rss(uri) - libvirt_rss(f"test://{empty}")
    return out


_ECHO = """
import asyncio, sys
try:
    import uvloop
    run = uvloop.run
except ImportError:
    run = asyncio.run
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 1500\\r\\n\\r\\n" + b"x" * 1500
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        total = 0
        for i in range(1500):          # ~60 µs of Python per request, like a GetInstance
            total += i
        self.transport.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
run(main())
"""


def echo_floor(seconds: float = SAMPLE_SECONDS) -> dict[str, float]:
    """This machine's floor for GetInstance's p99 / p50: a trivial uvloop server (a
    fixed answer after ~60 µs of Python) timed the same way, one keep-alive connection,
    for `seconds`. A shared machine's scheduling noise alone puts it above 1."""
    import socket
    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())         # type: ignore[union-attr]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = b"POST / HTTP/1.1\r\nContent-Length: 600\r\n\r\n" + b"y" * 600
        size = len(b"HTTP/1.1 200 OK\r\nContent-Length: 1500\r\n\r\n") + 1500
        times = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            sock.sendall(request)
            got = 0
            while got < size:
                got += len(sock.recv(65536))
            times.append(time.perf_counter() - t)
        sock.close()
    finally:
        proc.kill()
        proc.wait()
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99) - 1]
    return {"p50_s": p50, "p99_s": p99, "ratio": p99 / p50}


def getinstance_at(n: int, workdir: Path) -> dict:
    """GetInstance alone in the in-process configuration at `n` domains (issue 16's
    p99 <= 3x p50 at 100, 1,000 and 10,000): p50 / p99 beside pywbem_mock, and
    without a pause through a metrics sample."""
    print(f"--- in-process test driver, N = {n}: GetInstance", flush=True)
    node = workdir / f"node-{n}.xml"
    configs = write_node(node, n)
    served = Served(f"test://{node}", n, workdir, configs)
    try:
        peer = mock_peer(served)      # type: ignore[arg-type]  # duck-typed Setup
        gi = getinstance_latency(served, peer)      # type: ignore[arg-type]
        del peer
        out = {"n": n, "startup_s": served.startup_s, "getinstance_p50_s": gi["p50_s"],
               "getinstance_p99_s": gi["p99_s"], "mock_getinstance_p50_s": gi["mock_p50_s"]}
        through = getinstance_through_sample(served.port, configs)
        out.update({f"getinstance_sample_{k}": v for k, v in through.items()})
        out.update({f"echo_floor_{k}": v for k, v in echo_floor().items()})
        return out
    finally:
        served.close()


def report_getinstance(r: dict) -> str:
    return (f"in-process, N = {r['n']}: GetInstance p50 {r['getinstance_p50_s'] * 1e6:.0f} µs, "
            f"p99 {r['getinstance_p99_s'] * 1e6:.0f} µs "
            f"({r['getinstance_p99_s'] / r['getinstance_p50_s']:.2f}x p50; "
            f"p50 {r['getinstance_p50_s'] / r['mock_getinstance_p50_s']:.2f}x pywbem_mock); "
            f"for {SAMPLE_SECONDS:.0f} s through a metrics sample: p50 "
            f"{r['getinstance_sample_p50_s'] * 1e6:.0f} µs, p99 "
            f"{r['getinstance_sample_p99_s'] * 1e6:.0f} µs "
            f"({r['getinstance_sample_p99_s'] / r['getinstance_sample_p50_s']:.2f}x), max "
            f"{r['getinstance_sample_max_s'] * 1e3:.1f} ms; {_floor_text(r)}")


def _floor_text(r: dict) -> str:
    return (f"the machine's floor (a trivial uvloop server, same loop): p99 "
            f"{r['echo_floor_ratio']:.2f}x p50" if "echo_floor_ratio" in r else "")


_RSS = """
import ctypes, sys, libvirt
c = libvirt.open(sys.argv[1])
c.listAllDomains()
try:                    # what the server does (server/heap.py): free heap given back
    ctypes.CDLL(None).malloc_trim(0)
except (OSError, AttributeError):
    pass
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) / 1024)
"""


def libvirt_rss(uri: str) -> float:
    """RSS (MiB) of a process that only opened `uri` with libvirt and listed it (and
    gave its free heap back, as the server does): the test driver's own share of an
    in-process server."""
    return float(subprocess.run([sys.executable, "-c", _RSS, uri], capture_output=True,
                                text=True, check=True).stdout)


def baseline_rss(workdir: Path) -> float:
    """RSS (MiB) of run.py's configuration (libvirtd + Manager) with no domain at all,
    after the same workload as the measured servers."""
    print("--- empty server (RSS baseline): setting up", flush=True)
    setup = Setup(0, workdir)
    try:
        cli = RawClient(setup.port)
        _workload(cli)
        host = setup.wbem.EnumerateInstanceNames("VIRT_HostSystem")[0]
        cli.call("Associators", _envelope("Associators", '<IPARAMVALUE NAME="ObjectName">'
                                          + _instancename("VIRT_HostSystem", dict(host.keybindings))
                                          + "</IPARAMVALUE>"
                                          + _classname("AssocClass", "VIRT_HostedDependency")))
        return setup.rss_mib()
    finally:
        setup.close()


def report(r: dict) -> str:
    n = r["n"]
    lines = [f"in-process test driver (test:///node.xml, {n} running domains, no Manager):",
             f"  start-up (spawn -> first EnumerateInstances of all {n}): "
             f"{r['startup_s']:.2f} s; libvirt alone opens and lists them in "
             f"{r['floor_libvirt_list_s']:.2f} s from its spawn ("
             f"{statistics.median(r.get('libvirt_list_inside_runs_s') or [float('nan')]):.2f}"
             f" s after its interpreter started) (bar: +1 s = "
             f"{r['floor_libvirt_list_s'] + 1:.2f} s); medians of {STARTUP_PAIRS} timed in "
             f"turn, start-up minus list per pair: "
             + ", ".join(f"{s - li:+.2f}" for s, li in zip(r["startup_runs_s"],
                                                          r["libvirt_list_runs_s"]))
             + f" s (median {r['startup_over_list_s']:+.2f} s; bar +1 s)"]
    for label in ("EnumerateInstances", "EnumerateInstanceNames", "Pull(1000)"):
        ours = r[f"server_{label}_s"]
        lines.append(f"  {label:<23} {ours * 1e3:8.1f} ms, HTTP floor "
                     f"{r[f'floor_http_{label}_s'] * 1e3:6.1f} ms, bare socket "
                     f"{r[f'floor_loopback_{label}_s'] * 1e3:6.1f} ms for "
                     f"{r['bytes'][label]} bytes: {ours / r[f'floor_http_{label}_s']:.2f}x "
                     f"({ours / r[f'floor_loopback_{label}_s']:.2f}x)")
    lines.append(f"  GetInstance p50 {r['getinstance_p50_s'] * 1e6:.0f} µs, p99 "
                 f"{r['getinstance_p99_s'] * 1e6:.0f} µs; pywbem_mock "
                 f"{r['mock_getinstance_p50_s'] * 1e6:.0f} µs: p50 "
                 f"{r['getinstance_p50_s'] / r['mock_getinstance_p50_s']:.2f}x mock, p99 "
                 f"{r['getinstance_p99_s'] / r['getinstance_p50_s']:.2f}x p50")
    lines.append(f"  GetInstance for {SAMPLE_SECONDS:.0f} s without a pause (a metrics sample "
                 f"included): p50 {r['getinstance_sample_p50_s'] * 1e6:.0f} µs, p99 "
                 f"{r['getinstance_sample_p99_s'] * 1e6:.0f} µs, max "
                 f"{r['getinstance_sample_max_s'] * 1e3:.1f} ms over "
                 f"{r['getinstance_sample_count']} calls")
    if "echo_floor_ratio" in r:
        lines.append(f"  {_floor_text(r)} (p50 {r['echo_floor_p50_s'] * 1e6:.0f} µs)")
    per = (r["rss_mib"] - r["baseline_rss_mib"]) * 1024 / n
    ours = (r["rss_mib"] - r["baseline_rss_mib"] - r["libvirt_rss_mib"]) * 1024 / n
    lines.append(f"  RSS {r['rss_mib']:.0f} MiB, empty server {r['baseline_rss_mib']:.0f} MiB: "
                 f"{per:.1f} KiB per domain, of which libvirt's test driver "
                 f"{r['libvirt_rss_mib'] * 1024 / n:.1f} KiB (the server's own: {ours:.1f} KiB)")
    if "nometrics_rss_mib" in r:
        quiet = (r["nometrics_rss_mib"] - r["nometrics_baseline_rss_mib"]
                 - r["libvirt_rss_mib"]) * 1024 / n
        lines.append(f"  without metrics sampling (--metrics-interval 0): the server's own RSS "
                     f"{quiet:.1f} KiB per domain; GetInstance for {SAMPLE_SECONDS:.0f} s: p50 "
                     f"{r['nometrics_getinstance_sample_p50_s'] * 1e6:.0f} µs, p99 "
                     f"{r['nometrics_getinstance_sample_p99_s'] * 1e6:.0f} µs, max "
                     f"{r['nometrics_getinstance_sample_max_s'] * 1e3:.1f} ms")
    lines.append(f"  loop stall {r['loop_stall_ms']:.1f} ms worst lateness (parsing a "
                 f"{r['loop_stall_request_bytes'] / 2**20:.0f} MiB request "
                 f"{r['loop_stall_request_ms']:.1f} ms, writing {n} instances "
                 f"{r['loop_stall_response_ms']:.1f} ms)")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, str(ROOT))
    compile_bytecode()
    sizes = sorted(int(a) for a in sys.argv[1:]) or [10_000]
    with tempfile.TemporaryDirectory(prefix="cim-bench-inproc-") as tmp:
        # the smaller sizes: GetInstance only (python -m bench.inprocess 100 1000 10000)
        small = [report_getinstance(getinstance_at(n, Path(tmp))) for n in sizes[:-1]]
        print(report(measure_inprocess(sizes[-1], Path(tmp))))
        for line in small:
            print(line)
