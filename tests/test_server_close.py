"""A closed server is garbage: nothing in the process keeps its classes, providers or
sources once it is closed and let go.

What used to keep them: libvirt-python's close callback (never freed by drivers without
close callbacks, the in-process test driver among them), and the per-process caches of
instance shapes and system templates, which hold the class they were made for. A
process that starts servers one after another (the tests') grew by ~40,000 objects per
server, and its full collections took over a second, long enough to delay in-process
indications past their deadline.
"""
from __future__ import annotations

import gc
import time
import weakref

import pywbem

try:
    from tests.support.indications import LibvirtServer
    from tests.support.model import connect_wbem
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support.indications import LibvirtServer
    from support.model import connect_wbem

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"   # "test", running in test:///default


def _classes() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is pywbem.CIMClass)


def _serve_once(state_dir) -> dict[str, weakref.ref]:
    """Start a server, ask it what makes it build shapes and templates, close it: weak
    references to what it was made of."""
    srv = LibvirtServer(state_dir).start()
    try:
        conn = connect_wbem(srv.url)
        systems = conn.EnumerateInstances("VIRT_ComputerSystem")
        assert TEST_UUID in {s["Name"] for s in systems}
        one = conn.GetInstance(pywbem.CIMInstanceName(
            "VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem",
                                    "Name": TEST_UUID}))
        assert one["Name"] == TEST_UUID
        conn.close()
        handle = srv.handle
        assert handle is not None and handle.sources is not None
        return {"repository": weakref.ref(handle.dispatcher.repo),
                "dispatcher": weakref.ref(handle.dispatcher),
                "libvirt source": weakref.ref(handle.sources.libvirt),
                "inventory": weakref.ref(handle.sources.inventory)}
    finally:
        srv.close()


def test_a_closed_server_is_garbage(tmp_path):
    _serve_once(tmp_path / "first")     # whatever a first server leaves for good
    before = _classes()
    kept = _serve_once(tmp_path / "second")
    # libvirt frees deregistered event callbacks from its event thread: a moment
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        alive = sorted(name for name, ref in kept.items() if ref() is not None)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"still referenced after close: {alive}"
    # The classes are not weakly referable: counted. The second server's are all gone.
    assert _classes() <= before
