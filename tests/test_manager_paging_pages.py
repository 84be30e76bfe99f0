"""The client's walk through ListDomainsPage with a Manager written for the test: each
page is parsed as it arrives while the next one is asked for, so the rules that
span pages (a UUID listed twice keeps the first, a bad entry is skipped) and a page
that fails in the middle must still come out as with one ListDomains.

(No `from __future__ import annotations`: the D-Bus decorators read the annotations.)
"""
from typing import Any, List

import pytest

from cim_provider.contract import ERROR_FAILED
from cim_provider.contract.bus import DBusError, Variant, method
from cim_provider.sources.manager import ManagerClient

try:
    from tests.support import eventually, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (a fixture)
    from tests.support.minimal_manager import SignalingManager, serve_minimal
except ImportError:
    from support import eventually, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore  # noqa: F401
    from support.minimal_manager import SignalingManager, serve_minimal  # type: ignore

pytestmark = pytest.mark.dbus

PAGE = 3


def U(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def entry(n: int, name: str = "") -> dict:
    return {"UUID": Variant("s", U(n)), "Name": Variant("s", name or f"p{n}"),
            "Active": Variant("b", False)}


class PagedManager(SignalingManager):
    """ListDomains in pages of PAGE (the cursor is the index to go on from); the page
    numbers in `fail_pages` fail once each with Error.Failed."""

    def __init__(self, entries: List[Any]) -> None:
        super().__init__(entries)
        self.asked: List[str] = []
        self.fail_pages: List[int] = []

    @method()
    async def ListDomainsPage(self, cursor: "s", limit: "u") -> "aa{sv}s":
        self.asked.append(cursor)
        start = int(cursor or 0)
        if start // PAGE in self.fail_pages:
            self.fail_pages.remove(start // PAGE)
            raise DBusError(ERROR_FAILED, "this page fails once (a test)")
        end = start + PAGE
        return [self.entries[start:end], str(end) if end < len(self.entries) else ""]


# 11 entries over 4 pages: #7 repeats the UUID of #1 (a later page), #4 has no Name.
ENTRIES = [entry(0), entry(1, "first"), entry(2), entry(3),
           {"UUID": Variant("s", U(4))}, entry(5), entry(6), entry(1, "second"),
           entry(8), entry(9), entry(10)]
EXPECTED = {U(n) for n in (0, 1, 2, 3, 5, 6, 8, 9, 10)}


@pytest.mark.parametrize("fail_pages", [[], [2]], ids=["all pages", "page 2 fails once"])
def test_a_walk_in_pages_equals_one_listing(dbus_address, fail_pages):
    async def scenario():
        mgr = PagedManager(list(ENTRIES))
        mgr.fail_pages = list(fail_pages)
        served = await serve_minimal(dbus_address, manager=mgr)
        seen: list = []
        client = ManagerClient(dbus_address, relist_interval=0.1,
                               on_change=lambda d: seen.append(d))
        try:
            await client.start()
            await eventually(lambda: client.definitions is not None, within=10.0,
                             what="the walk")
            assert set(client.definitions) == EXPECTED
            assert client.definitions[U(1)].name == "first"      # the first one kept
            assert seen[-1] == client.definitions
            # every page asked for once, in order; a failed walk starts again
            pages = ["", "3", "6", "9"]
            if fail_pages:
                assert mgr.asked[:3] == pages[:3] and mgr.asked[3:] == pages, mgr.asked
                assert len(seen) == 1           # nothing shown from the failed walk
            else:
                assert mgr.asked == pages, mgr.asked
        finally:
            await client.stop()
            await served.stop()
    run(scenario())
