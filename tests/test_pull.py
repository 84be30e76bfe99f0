"""PullContexts on their own: slices, the byte budget, caps, closing."""
from __future__ import annotations

import pytest
import pywbem
from pywbem import CIMError

from cim_provider.wbem.pull import PullContexts

ITEMS = [f"<VALUE.INSTANCEWITHPATH>{i:04d}</VALUE.INSTANCEWITHPATH>" for i in range(10)]
HELD = sum(map(len, ITEMS[2:]))      # what a context opened with MaxObjectCount 2 keeps


def test_slices_until_end_of_sequence():
    pc = PullContexts()
    cid, first, eos = pc.open("root/virt", "instances", ITEMS, 2, 60, "a")
    assert (first, eos) == (ITEMS[:2], False)
    got = list(first)
    while not eos:
        chunk, eos, cid = pc.pull("root/virt", "instances", cid, 3, "a")
        got += chunk
    assert got == ITEMS and len(pc) == 0


BUDGET = [
    # (desc, max_bytes, contexts that fit)
    ("room for exactly two", 2 * HELD, 2),
    ("one byte short of two", 2 * HELD - 1, 1),
    ("not even one", HELD - 1, 0),
]


@pytest.mark.parametrize("desc,max_bytes,fit", BUDGET, ids=[b[0] for b in BUDGET])
def test_byte_budget(desc, max_bytes, fit):
    pc = PullContexts(max_bytes=max_bytes)
    opened = [pc.open("root/virt", "instances", ITEMS, 2, 60, "a")[0] for _ in range(fit)]
    with pytest.raises(CIMError) as exc:
        pc.open("root/virt", "instances", ITEMS, 2, 60, "a")
    assert exc.value.status_code == pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED
    # A result that fits in one response holds nothing and is always answered.
    assert pc.open("root/virt", "instances", ITEMS, 10, 60, "a")[2] is True
    if opened:               # closing one frees its share of the budget
        pc.close("root/virt", opened[0], "a")
        assert pc.open("root/virt", "instances", ITEMS, 2, 60, "a")[0] is not None


def test_other_client_and_kind_cannot_pull():
    pc = PullContexts()
    cid, _, _ = pc.open("root/virt", "instances", ITEMS, 2, 60, "a")
    for ns, kind, client in [("root/virt", "instances", "b"), ("root/virt", "paths", "a"),
                             ("interop", "instances", "a")]:
        with pytest.raises(CIMError) as exc:
            pc.pull(ns, kind, cid, 1, client)
        assert exc.value.status_code == pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT
