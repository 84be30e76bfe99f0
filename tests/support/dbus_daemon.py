"""A private dbus-daemon per test (or module): real D-Bus, never a mock.

The daemon itself is the project's own PrivateBus (also used by the demo and the
benchmark); this module adds the pytest fixture and environment helper.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cim_provider.busdaemon import PrivateBus

# Tests name it by its old name; it is the same thing.
DBusDaemon = PrivateBus


def private_bus() -> Iterator[str]:
    """Generator for fixtures: yields the address of a fresh private bus."""
    daemon = PrivateBus()
    try:
        yield daemon.address
    finally:
        daemon.stop()


@pytest.fixture
def dbus_address() -> Iterator[str]:
    """A fresh private bus for one test (import this fixture into a test module)."""
    yield from private_bus()


def subprocess_env(address: str) -> dict[str, str]:
    """Environment for a child process that should use `address` as both buses."""
    env = dict(os.environ)
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    env["DBUS_SYSTEM_BUS_ADDRESS"] = address
    return env
