"""Devices and metrics at N running domains (one disk and one NIC each), in-process.

The server runs on a loop thread of this process, on libvirt's test:///default, so
the probe that measures its loop's lateness runs on that very loop. Sampling is
triggered by hand (the interval is an hour), so each figure is taken at a known
point: right after a sample (values cold: built by the request) or again (warm).

Figures: EnumerateInstances of VIRT_ComputerSystem, VIRT_LogicalDisk and
VIRT_BaseMetricValue (server time over raw HTTP, median of 5 after a warm-up, and
per instance), the first VIRT_BaseMetricValue enumeration after a sample (cold), the
time of one usage sample of every domain (getAllDomainStats; the test driver answers
CPU, balloon, block and interface statistics per domain), and the worst lateness of
the loop meanwhile.
"""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import uuid as uuidlib
from typing import Any, Callable

import libvirt
import pywbem

from cim_provider.domain.domxml import config_to_domain_xml
from cim_provider.domain.records import Disk, DomainConfig, Nic

CLASSES = ("VIRT_ComputerSystem", "VIRT_LogicalDisk", "VIRT_BaseMetricValue")


class Client:
    """run.py's RawClient, reading into one growing bytearray: a 60 MB answer (60,000
    metric values) costs its bytes once, not the quadratic copies of `bytes +=`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, method: str, body: bytes) -> int:
        head = (f"POST /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f'Content-Type: application/xml; charset="utf-8"\r\n'
                f"Content-Length: {len(body)}\r\nCIMOperation: MethodCall\r\n"
                f"CIMMethod: {method}\r\nCIMObject: root/virt\r\nCIMProtocolVersion: 1.0\r\n\r\n")
        self.sock.sendall(head.encode() + body)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(1 << 16)
        end = buf.index(b"\r\n\r\n") + 4
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", bytes(buf[:end]))
        if m is None or not buf.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{method}: {bytes(buf[:200])!r}")
        size = end + int(m.group(1))
        data = bytearray(size)
        view = memoryview(data)
        got = len(buf)
        view[:got] = buf
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if not n:
                raise RuntimeError("server closed the connection")
            got += n
        if b"<ERROR" in data[end:end + 2000]:
            raise RuntimeError(f"{method}: {bytes(data[end:end + 300])!r}")
        return size - end


def _domain(i: int) -> str:
    mac = f"52:54:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    cfg = DomainConfig(uuid=str(uuidlib.uuid4()), name=f"dev-{i:05d}", type="Test",
                       os_type="hvm", arch="x86_64", vcpus=1, memory_kib=1024,
                       max_memory_kib=1024,
                       disks=(Disk("vda", f"/images/dev-{i:05d}.img", "disk", "virtio"),),
                       nics=(Nic(mac, "network", "default", "virtio"),))
    return config_to_domain_xml(cfg)


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 1800) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _lateness(during: Callable[[], Any]) -> tuple[float, float]:
    """(seconds `during()` took, worst lateness of a 1 ms probe on this loop meanwhile)."""
    worst = 0.0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal worst
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    task = asyncio.ensure_future(probe())
    t0 = time.perf_counter()
    await during()
    took = time.perf_counter() - t0
    done.set()
    await task
    return took, worst


def measure_devices_and_metrics(n: int, envelope: Callable[[str, str], bytes],
                                classname: Callable[[str, str], str],
                                median_time: Callable[..., float]) -> dict[str, Any]:
    from cim_provider.server.main import start_server, start_sources
    from cim_provider.sources.libvirt import ensure_event_loop_impl

    lt = _Loop()
    conn = libvirt.open("test:///default")
    out: dict[str, Any] = {"n": n}
    handle = None
    try:
        t0 = time.perf_counter()
        for i in range(n):
            conn.createXML(_domain(i), 0)
        out["create_s"] = time.perf_counter() - t0

        async def start() -> Any:
            ensure_event_loop_impl()
            sources = await start_sources(libvirt_conn=conn, manager_bus=None,
                                          metrics_interval=3600.0)
            return await start_server([("127.0.0.1", 0)], sources=sources,
                                      host="bench.example.test")

        handle = lt.run(start())
        src = handle.sources.libvirt
        out["sample_s"], out["sample_loop_lateness_s"] = lt.run(_lateness(src.sample_usage))
        lt.run(_lateness(src.sample_usage))          # a second sample: interval figures
        port = handle.addresses[0][1]
        cli = Client(port)
        wbem = pywbem.WBEMConnection(f"http://127.0.0.1:{port}", default_namespace="root/virt",
                                     timeout=600)
        bodies = {c: envelope("EnumerateInstances", classname("ClassName", c)) for c in CLASSES}
        for c in CLASSES[:2]:          # cold: the first read builds and renders every instance
            t = time.perf_counter()
            out[f"{c}_bytes"] = cli.call("EnumerateInstances", bodies[c])
            out[f"{c}_cold_s"] = time.perf_counter() - t
        counts = {c: len(wbem.EnumerateInstanceNames(c)) for c in CLASSES}
        # cold: the first read after a new sample builds every value
        lt.run(_lateness(src.sample_usage))
        t = time.perf_counter()
        out["VIRT_BaseMetricValue_bytes"] = cli.call("EnumerateInstances",
                                                     bodies["VIRT_BaseMetricValue"])
        out["VIRT_BaseMetricValue_cold_s"] = time.perf_counter() - t
        for c in CLASSES:
            out[f"{c}_count"] = counts[c]
            out[f"{c}_s"] = median_time(lambda c=c: cli.call("EnumerateInstances", bodies[c]))
            out[f"{c}_us_per_instance"] = out[f"{c}_s"] / counts[c] * 1e6
        for c in CLASSES:
            out[f"{c}_cold_us_per_instance"] = out[f"{c}_cold_s"] / counts[c] * 1e6
        wbem.close()
    finally:
        if handle is not None:
            lt.run(handle.close())
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT):
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        conn.close()
        lt.stop()
    return out


def report(r: dict[str, Any]) -> str:
    cs = r["VIRT_ComputerSystem_us_per_instance"]
    lines = [f"devices and metrics at {r['n']} running domains (one disk, one NIC each; "
             f"in-process, test:///default):"]
    cold_cs = r["VIRT_ComputerSystem_cold_us_per_instance"]
    for c in CLASSES:
        lines.append(f"  EnumerateInstances {c:<22} {r[f'{c}_count']:>6} instances "
                     f"({r[f'{c}_bytes'] / 2**20:.1f} MiB): "
                     f"{r[f'{c}_s'] * 1e3:>7.1f} ms, {r[f'{c}_us_per_instance']:>5.2f} µs each "
                     f"({r[f'{c}_us_per_instance'] / cs:.2f}x VIRT_ComputerSystem); first "
                     f"read {r[f'{c}_cold_s'] * 1e3:>7.1f} ms, "
                     f"{r[f'{c}_cold_us_per_instance']:>6.1f} µs each "
                     f"({r[f'{c}_cold_us_per_instance'] / cold_cs:.2f}x)")
    lines.append("  (first read: the server's first EnumerateInstances of the class, which builds "
                 "and renders its instances; VIRT_ComputerSystem's are built at start-up for "
                 "the lifecycle indications, so its first read only renders them; for "
                 "VIRT_BaseMetricValue the first read after a new sample, whose values a "
                 "worker thread builds)")
    lines.append(f"  one usage sample of every domain: {r['sample_s'] * 1e3:.0f} ms; worst "
                 f"loop lateness meanwhile {r['sample_loop_lateness_s'] * 1e3:.1f} ms")
    return "\n".join(lines)
