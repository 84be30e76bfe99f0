"""The farm benchmark: 100,000 definitions in PostgreSQL, two hosts, every part real.

Each host (tests/support/farm.py) has its own libvirtd (test driver), dbus-daemon,
`cim-provider manager --store postgresql:...` and `cim-provider serve`; both share
one throw-away PostgreSQL (tests/support/postgres.py). Figures only, no assertions:

- RSS of `serve` and GetInstance p50 at 1,000, 10,000 and 100,000 definitions;
- farm-wide starts per second with two hosts (1,000 starts on each, concurrently);
- RSS of `serve` holding ~100,000 passive definitions plus 1,000 running domains;
- EnumerateInstances of all of them, as a pull in pages of 1,000;
- define on A -> visible through CIM on B, p50 / p99 over 200 defines;
- time to the first full sync of a cold server at 100,000.

Run alone with `python -m bench.farm` (`--definitions 10000 --running 200 --defines 50`
for a quicker, smaller run while developing); `make bench` runs it after the main
benchmark at full size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.run import RawClient, _classname, _envelope, _instancename, pull_all  # noqa: E402
from tests.support.farm import FarmHost, dbus_call, seed_sql, wait_until  # noqa: E402
from tests.support.postgres import Postgres, pg_bindir  # noqa: E402

MEMORY_KIB = 512          # 1,000 of them fit in the test driver's free memory


def _rss_mib(proc) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2 ** 20


def _host_ok(host: FarmHost) -> bool:
    conn = host.conn()
    try:
        return conn.EnumerateInstances("VIRT_HostSystem")[0]["OperationalStatus"] == [2]
    except Exception:
        return False
    finally:
        conn.close()


def _count(host: FarmHost) -> int:
    """How many systems the server names (EnumerateInstanceNames, counted in the raw
    response: parsing 100,000 names with pywbem took this client ~40 s per look)."""
    cli = RawClient(host.port)
    try:
        body = cli.call("EnumerateInstanceNames", _envelope(
            "EnumerateInstanceNames", _classname("ClassName", "VIRT_ComputerSystem")))
        return bytes(body).count(b"<INSTANCENAME ")
    finally:
        cli.sock.close()


def _pct(values: list[float], q: float) -> float:
    """The q-quantile of sorted `values` (nearest rank)."""
    return values[min(len(values) - 1, max(0, int(round(q * len(values))) - 1))]


def _getinstance_p50(host: FarmHost, uuids: list[str], calls: int = 400) -> float:
    cli = RawClient(host.port)
    bodies = [_envelope("GetInstance", '<IPARAMVALUE NAME="InstanceName">' + _instancename(
        "VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem", "Name": u})
        + "</IPARAMVALUE>") for u in uuids[:50]]
    for b in bodies:
        cli.call("GetInstance", b)
    times = []
    for i in range(calls):
        t = time.perf_counter()
        cli.call("GetInstance", bodies[i % len(bodies)])
        times.append(time.perf_counter() - t)
    cli.sock.close()
    return statistics.median(times)


def _uuids(pg: Postgres, prefix: str, n: int | None = None) -> list[str]:
    limit = f" LIMIT {n}" if n else ""
    return pg.farm_sql(f"SELECT uuid FROM definitions WHERE name LIKE '{prefix}-%' "
                       f"ORDER BY name{limit}").split()


def _wait_count(host: FarmHost, n: int, within: float) -> float:
    t = time.monotonic()
    wait_until(lambda: _count(host) >= n, within, f"{n} systems on {host.name}", step=0.5)
    return time.monotonic() - t


def _starts(hosts: list[FarmHost], per_host: dict[str, list[str]], lanes: int = 8) -> float:
    jobs = [(h, u) for h in hosts for u in per_host[h.name]]

    def lane(k: int) -> int:
        ok = 0
        for h, u in jobs[k::lanes * len(hosts)]:
            try:
                dbus_call(h.bus.address, "StartDomain", "s", [u], timeout=120)
                ok += 1
            except Exception as exc:
                print(f"  start of {u} on {h.name} failed: {exc}", file=sys.stderr)
        return ok
    t = time.monotonic()
    with ThreadPoolExecutor(lanes * len(hosts)) as pool:
        done = sum(pool.map(lane, range(lanes * len(hosts))))
    elapsed = time.monotonic() - t
    return done / elapsed


def _define_latency(a: FarmHost, b: FarmHost, n: int = 200) -> tuple[list[float], list[float]]:
    """Per define: from the DefineDomain call on A until GetInstance on B finds it, and
    how long of that the DefineDomain call itself took (this client's connection to
    A's bus included)."""
    from cim_provider.contract import values_to_dbus
    cli = RawClient(b.port)
    out, calls = [], []
    for i in range(n):
        t = time.perf_counter()
        uuid = dbus_call(a.bus.address, "DefineDomain", "a{sv}",
                         [values_to_dbus({"Name": f"latency-{i}", "Type": "Test",
                                          "MemoryKiB": MEMORY_KIB})])[0]
        calls.append(time.perf_counter() - t)
        body = _envelope("GetInstance", '<IPARAMVALUE NAME="InstanceName">' + _instancename(
            "VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem", "Name": uuid})
            + "</IPARAMVALUE>")
        while True:
            try:
                cli.call("GetInstance", body)
                break
            except RuntimeError:
                time.sleep(0.002)
        out.append(time.perf_counter() - t)
    cli.sock.close()
    return out, calls


def farm_bench(out_dir: Path | None = None, definitions: int = 100_000, running: int = 1000,
               defines: int = 200) -> dict:
    """Figures with `definitions` in the farm at the end, `running` started on each of
    the two hosts, and `defines` timed define-to-visible round trips."""
    if pg_bindir() is None:
        print("farm benchmark skipped: PostgreSQL is not installed")
        return {}
    results: dict = {"stages": []}
    with tempfile.TemporaryDirectory(prefix="cim-farm-bench-") as tmp:
        pg = Postgres()
        hosts: list[FarmHost] = []
        try:
            work = Path(tmp)
            a = FarmHost("bench-a", pg, work, lease=30.0)
            hosts.append(a)
            b = FarmHost("bench-b", pg, work, lease=30.0)
            hosts.append(b)
            total = 0
            sizes = sorted({s for s in (1_000, 10_000) if s < definitions} | {definitions})
            for size in sizes:
                pg.farm_sql(seed_sql(size - total, f"s{size}", MEMORY_KIB))
                total = size
                took = _wait_count(a, total, 600)
                uuids = _uuids(pg, f"s{sizes[0]}", 50)
                stage = {"definitions": total, "sync_s": took,
                         "serve_rss_mib": _rss_mib(a.server),
                         "manager_rss_mib": _rss_mib(a.manager),
                         "getinstance_p50_us": _getinstance_p50(a, uuids) * 1e6}
                results["stages"].append(stage)
                print(f"[farm] {total:>7,} definitions: seen on A after {took:.1f} s, serve RSS "
                      f"{stage['serve_rss_mib']:.0f} MiB, Manager RSS "
                      f"{stage['manager_rss_mib']:.0f} MiB, GetInstance p50 "
                      f"{stage['getinstance_p50_us']:.0f} µs", flush=True)
            # `running` starts on each host, all at once
            pool = _uuids(pg, f"s{sizes[-1]}", 2 * running)
            rate = _starts([a, b], {a.name: pool[:running], b.name: pool[running:2 * running]})
            results["starts_per_s"] = rate
            print(f"[farm] starts farm-wide with 2 hosts: {rate:.0f} per second", flush=True)
            time.sleep(2)
            results["definitions"], results["running_per_host"] = definitions, running
            results["serve_rss_mib_100k_plus_1000_running"] = _rss_mib(a.server)
            results["getinstance_p50_us_100k"] = _getinstance_p50(
                a, _uuids(pg, f"s{sizes[0]}", 50)) * 1e6
            cli = RawClient(a.port)
            t = time.monotonic()
            nbytes = pull_all(cli)
            results["pull_all_s"] = time.monotonic() - t
            results["pull_all_mib"] = nbytes / 2 ** 20
            results["serve_rss_mib_after_pull"] = _rss_mib(a.server)
            cli.sock.close()
            print(f"[farm] serve with ~{definitions:,} passive + {running:,} running: RSS "
                  f"{results['serve_rss_mib_100k_plus_1000_running']:.0f} MiB "
                  f"({results['serve_rss_mib_after_pull']:.0f} MiB after the pull); "
                  f"GetInstance p50 {results['getinstance_p50_us_100k']:.0f} µs; "
                  f"pull of all in pages of 1,000: {results['pull_all_s']:.1f} s "
                  f"({results['pull_all_mib']:.0f} MiB)", flush=True)
            lat, calls = (sorted(x) for x in _define_latency(a, b, defines))
            results["define_to_visible_p50_ms"] = _pct(lat, 0.5) * 1e3
            results["define_to_visible_p99_ms"] = _pct(lat, 0.99) * 1e3
            results["define_call_p50_ms"] = _pct(calls, 0.5) * 1e3
            results["define_call_p99_ms"] = _pct(calls, 0.99) * 1e3
            print(f"[farm] define on A -> visible through CIM on B: p50 "
                  f"{results['define_to_visible_p50_ms']:.0f} ms, p99 "
                  f"{results['define_to_visible_p99_ms']:.0f} ms (of which the DefineDomain "
                  f"call on A: p50 {results['define_call_p50_ms']:.0f} ms, p99 "
                  f"{results['define_call_p99_ms']:.0f} ms)", flush=True)
            # a cold server at 100,000: B's serve restarted
            from tests.support import stop_process
            stop_process(b.server)
            t = time.monotonic()
            b.start_server()
            wait_until(lambda: _host_ok(b), 600, "B's first full sync", step=0.2)
            results["cold_first_sync_s"] = time.monotonic() - t
            results["cold_serve_rss_mib"] = _rss_mib(b.server)
            print(f"[farm] cold server at {definitions:,}: first full sync "
                  f"{results['cold_first_sync_s']:.1f} s "
                  f"(RSS {results['cold_serve_rss_mib']:.0f} MiB)", flush=True)
        finally:
            stopper = [threading.Thread(target=h.stop) for h in hosts]
            for th in stopper:
                th.start()
            for th in stopper:
                th.join()
            pg.cleanup()
    out = (out_dir or ROOT / "bench") / "farm_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"[farm] wrote {out}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the farm benchmark (figures, no assertions)")
    ap.add_argument("--definitions", type=int, default=100_000,
                    help="definitions in the farm at the last stage (default: %(default)s)")
    ap.add_argument("--running", type=int, default=1000,
                    help="domains started on each of the two hosts (default: %(default)s)")
    ap.add_argument("--defines", type=int, default=200,
                    help="timed define-on-A, visible-on-B round trips (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where farm_results.json goes (default: bench/)")
    opts = ap.parse_args()
    farm_bench(opts.out_dir, opts.definitions, opts.running, opts.defines)
