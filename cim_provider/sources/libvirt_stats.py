"""Usage statistics of the running domains: read in slices, kept packed.

One usage sample per `--metrics-interval` (docs/architecture.md, "CIM model" and
"Sources": the last two samples feed VIRT_BaseMetricValue). At 10,000 domains one
getAllDomainStats call builds every domain's answer in one piece of C code that holds
the GIL for tens of milliseconds, beside the event loop (issue 16: GetInstance p99 <=
3x p50). The sampler (sources/libvirt_host.py) therefore lists the active domains once
and asks virDomainListGetStats for a slice of CHUNK domains per call, each call in the
connection's threads, the loop running between them. Drivers whose bulk statistics
lack a domain's CPU time (libvirt's test driver) are asked per domain, as before, the
same slices at a time.

A sample is kept as numbers, not objects (issue 16: <= 4 KiB of RSS per domain): one
array of eight 64-bit integers per sample in domain order, and an index UUID -> row
that consecutive samples share while the same domains run (`PackedStats`, a read-only
Mapping of DomainStats made on access). Each slice goes straight into that array
(`Packer`): a row object per domain kept until the whole sample was read left ~3.5 MiB
of Python's small-object heap behind at 10,000 domains, and a listing through
getAllDomainStats (a dict per domain) as much again. Everything here blocks: the caller runs it in
the connection's threads.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import libvirt

from ..domain.records import DomainStats, RunningDomain, canonical_uuid

# Domains per virDomainListGetStats call (and per call of the per-domain reads): a few
# milliseconds of the call threads each, with the loop free between them.
CHUNK = 250

STATS = (libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
         | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_BLOCK
         | libvirt.VIR_DOMAIN_STATS_INTERFACE)

FIELDS = ("cpu_time_ns", "vcpus", "max_vcpus", "memory_used_kib", "block_rd_bytes",
          "block_wr_bytes", "net_rx_bytes", "net_tx_bytes")     # DomainStats, in order
WIDTH = len(FIELDS)
_UNKNOWN = -1                         # None in a packed row
_LIMIT = 2 ** 63                      # what a signed 64-bit slot holds

Row = tuple[Any, ...]                 # one domain's FIELDS, None when unknown


class PackedStats(Mapping[str, DomainStats]):
    """One sample's counters by UUID: `index` UUID -> row, `packed` WIDTH integers per
    row (-1: unknown); a value a slot cannot hold as itself (a negative one: a device
    call answering -1 for "not supported"; one of 2**63 or more, never seen: 2**63 ns
    is 292 years) is kept aside in `big` by (row, field)."""

    __slots__ = ("index", "packed", "big")

    def __init__(self, index: Mapping[str, int], values: array,
                 big: Mapping[tuple[int, int], int] | None = None) -> None:
        self.index = index
        self.packed = values
        self.big = big or {}

    def row(self, uuid: str) -> Row | None:
        """The counters of `uuid` as a tuple in FIELDS order; None when not sampled."""
        i = self.index.get(uuid)
        if i is None:
            return None
        base = i * WIDTH
        raw = self.packed[base:base + WIDTH]
        row = tuple(None if v == _UNKNOWN else v for v in raw)
        if self.big:
            row = tuple(self.big.get((i, f), v) for f, v in enumerate(row))
        return row

    def __getitem__(self, uuid: str) -> DomainStats:
        row = self.row(uuid)
        if row is None:
            raise KeyError(uuid)
        return DomainStats(*row)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class Packer:
    """One sample built slice by slice: the UUIDs (the running records' own strings) and
    their values straight into one integer array, so a sample of 10,000 domains leaves
    no row objects behind in Python's small-object heap (issue 16: RSS per domain)."""

    __slots__ = ("uuids", "values", "big")

    def __init__(self) -> None:
        self.uuids: list[str] = []
        self.values = array("q")
        self.big: dict[tuple[int, int], int] = {}

    def add(self, uuid: str, row: Row) -> None:
        """`row` (FIELDS values, None when unknown) as the next row."""
        i = len(self.uuids)
        self.uuids.append(uuid)
        append = self.values.append
        for f, v in enumerate(row):
            if v is None:
                append(_UNKNOWN)
            elif 0 <= v < _LIMIT:
                append(v)
            else:
                # Not a counter a slot holds as itself: a per-device call answering -1
                # for "not supported", or one of 2**63 or more (never seen).
                append(_UNKNOWN)
                self.big[(i, f)] = v

    def finish(self, previous: PackedStats | None = None) -> PackedStats:
        """The sample; the index of `previous` is reused when it names the same
        domains in the same order (a dict keeps its keys in insertion order)."""
        index: Mapping[str, int] | None = previous.index if previous is not None else None
        if index is None or len(index) != len(self.uuids) or any(
                a != b for a, b in zip(index, self.uuids)):
            index = {uuid: i for i, uuid in enumerate(self.uuids)}
        return PackedStats(index, self.values, self.big)


def pack(rows: Sequence[tuple[str, Row]], previous: PackedStats | None = None) -> PackedStats:
    """A PackedStats of `rows` ((uuid, FIELDS values) in order), as Packer builds it."""
    packer = Packer()
    for uuid, row in rows:
        packer.add(uuid, row)
    return packer.finish(previous)


def differing_vcpus(stats: PackedStats, running: Mapping[str, RunningDomain]) -> set[str]:
    """The domains of `running` whose vCPU counts (current, maximum) in `stats` differ
    from their record's, read from the packed numbers (no object per domain)."""
    out = set()
    packed, index, big = stats.packed, stats.index, stats.big
    cur_at, max_at = FIELDS.index("vcpus"), FIELDS.index("max_vcpus")
    for uuid, dom in running.items():
        i = index.get(uuid)
        if i is None:
            continue
        vcpus, max_vcpus = packed[i * WIDTH + cur_at], packed[i * WIDTH + max_at]
        if big:
            vcpus, max_vcpus = big.get((i, cur_at), vcpus), big.get((i, max_at), max_vcpus)
        cfg = dom.config
        if (vcpus != _UNKNOWN and vcpus != cfg.vcpus) or (
                max_vcpus != _UNKNOWN and cfg.max_vcpus is not None
                and max_vcpus != cfg.max_vcpus):
            out.add(uuid)
    return out


def _sum(stats: Mapping[str, Any], count: str, field: str) -> int | None:
    n = stats.get(count)
    if not isinstance(n, int):
        return None
    values = [stats.get(f"{count.split('.')[0]}.{i}.{field}") for i in range(n)]
    return sum(v for v in values if isinstance(v, int))


def memory_used(current: Any, available: Any, unused: Any, rss: Any) -> int | None:
    """In-use memory from the balloon: what the guest has minus what it leaves unused,
    else what the hypervisor process holds (rss), else the balloon's size."""
    if isinstance(available, int) and isinstance(unused, int) and available >= unused:
        return available - unused
    for value in (rss, current):
        if isinstance(value, int):
            return value
    return None


def bulk_row(stats: Mapping[str, Any]) -> Row:
    """FIELDS from one domain's bulk statistics."""
    return (stats.get("cpu.time"), stats.get("vcpu.current"), stats.get("vcpu.maximum"),
            memory_used(stats.get("balloon.current"), stats.get("balloon.available"),
                        stats.get("balloon.unused"), stats.get("balloon.rss")),
            _sum(stats, "block.count", "rd.bytes"), _sum(stats, "block.count", "wr.bytes"),
            _sum(stats, "net.count", "rx.bytes"), _sum(stats, "net.count", "tx.bytes"))


def domain_row(dom: libvirt.virDomain, running: RunningDomain | None) -> Row:
    """The same counters asked one call at a time, for drivers whose bulk statistics
    leave them out (the test driver reports only the state in bulk)."""
    info = dom.info()
    mem: dict[str, int] = {}
    try:
        mem = dom.memoryStats()
    except libvirt.libvirtError:
        pass
    rd = wr = rx = tx = None
    cfg = running.config if running is not None else None
    for disk in cfg.disks if cfg else ():
        try:
            st = dom.blockStats(disk.target)
        except libvirt.libvirtError:
            continue
        rd, wr = (rd or 0) + st[1], (wr or 0) + st[3]
    for nic in cfg.nics if cfg else ():
        try:
            st = dom.interfaceStats(nic.mac)
        except libvirt.libvirtError:
            continue
        rx, tx = (rx or 0) + st[0], (tx or 0) + st[4]
    return (int(info[4]), int(info[3]), None,
            memory_used(mem.get("actual", info[2]), mem.get("available"), mem.get("unused"),
                        mem.get("rss")),
            rd, wr, rx, tx)


def list_active(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """The active domains: one listing (no statistics object per domain)."""
    return conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)


def read_chunk(conn: libvirt.virConnect, doms: Sequence[libvirt.virDomain],
               running: Mapping[str, RunningDomain], packer: Packer, bulk: bool = True
               ) -> tuple[bool, int]:
    """The rows of `doms` added to `packer`: one virDomainListGetStats call (`bulk`),
    per-domain calls for the domains whose bulk answer lacks the CPU time. Returns
    whether bulk statistics are supported and how many rows came from them. A domain
    stopped meanwhile has no row. The UUID string kept is the running record's when
    there is one, so samples hold no copies of it."""
    answers: Sequence[tuple[libvirt.virDomain, Mapping[str, Any]]]
    if bulk:
        try:
            answers = conn.domainListGetStats(list(doms), STATS) if doms else []
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            bulk = False
    if not bulk:
        answers = [(dom, {}) for dom in doms]
    from_bulk = 0
    for dom, stats in answers:
        uuid = dom.UUIDString()
        rec = running.get(uuid)          # libvirt's form is the canonical one
        if rec is None:
            uuid = canonical_uuid(uuid) or uuid
            rec = running.get(uuid)
        if rec is not None:
            uuid = rec.uuid
        if "cpu.time" in stats:
            packer.add(uuid, bulk_row(stats))
            from_bulk += 1
            continue
        try:
            packer.add(uuid, domain_row(dom, rec))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:   # stopped meanwhile
                raise
    return bulk, from_bulk


def read_stats(conn: libvirt.virConnect,
               running: Mapping[str, RunningDomain]) -> PackedStats:
    """Every active domain's counters by UUID in one go (tests, tools); the sampler
    reads the same in slices."""
    doms = list_active(conn)
    packer = Packer()
    bulk = True
    for i in range(0, len(doms), CHUNK):
        bulk, _from_bulk = read_chunk(conn, doms[i:i + CHUNK], running, packer, bulk)
    return packer.finish()
