"""Shared fixtures: the real WBEM server as a subprocess, and in-process with test
providers (see tests/support/wbem_server.py)."""
from __future__ import annotations

import gc

import pytest
import pywbem

try:
    from tests.support.wbem_server import (InProcessServer, SubprocessServer,
                                           make_test_providers)
except ImportError:  # tests/ itself on sys.path (pytest's default rootdir conftest import)
    from support.wbem_server import InProcessServer, SubprocessServer, make_test_providers


def pytest_collection_finish(session):
    """What the process holds once the tests are collected (pywbem, libvirt, the test
    modules: ~140,000 objects) lives until it ends: frozen, full collections skip it.
    In-process servers share this process, and a full collection pauses them; with a
    grown heap (test_server_close.py) one took over a second, past the deadline of an
    indication."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def subprocess_server(tmp_path_factory):
    """`.venv/bin/cim-provider serve` on a free loopback port (interop providers only)."""
    srv = SubprocessServer(tmp_path_factory.mktemp("server") / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def inproc_server():
    """start_server() in a thread, with root/virt test providers."""
    srv = InProcessServer(make_test_providers)
    yield srv
    srv.stop()


def connect(url: str, namespace: str = "interop", timeout: int = 30) -> pywbem.WBEMConnection:
    return pywbem.WBEMConnection(url, default_namespace=namespace, timeout=timeout,
                                 no_verification=True)


@pytest.fixture
def interop_conn(subprocess_server):
    conn = connect(subprocess_server.url, "interop")
    yield conn
    conn.close()


@pytest.fixture
def virt_conn(inproc_server):
    conn = connect(inproc_server.url, "root/virt")
    yield conn
    conn.close()
