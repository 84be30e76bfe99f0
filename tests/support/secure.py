"""Set-ups for the security tests: the project's server in-process (own loop thread)
with the root/virt test providers, and optionally HTTPS, a users file and small limits;
raw HTTP/TLS helpers for what pywbem would never send.
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pywbem

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

from cim_provider.server.auth import User, format_users, hash_password


def write_users(path: Path, users: dict[str, tuple[str, str]]) -> Path:
    """{name: (password, role)} -> a users file with mode 0600 (cheap scrypt for speed)."""
    recs = {n: User(n, role, hash_password(pw, n=1 << 12)) for n, (pw, role) in users.items()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(format_users(recs))
    return path


USERS = {"alice": ("alice-password", "operator"), "bob": ("bob-password", "reader")}


class SecureServer:
    """start_server() with test providers on a private loop thread.

    `users`: {name: (password, role)} for a users file (None: no authentication);
    `https`: also listen with TLS (a self-signed pair in `workdir`)."""

    def __init__(self, workdir: Path, *, users: dict[str, tuple[str, str]] | None = None,
                 https: bool = False, limits=None, max_pull_per_client: int | None = None,
                 burst: int = 5, refill: float = 2.0, providers_factory=None) -> None:
        import argparse

        from cim_provider.server import security
        from cim_provider.server.main import start_server
        self.workdir = Path(workdir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="secure-test-server")
        self.thread.start()
        args = argparse.Namespace(login_burst=burst, login_refill=refill)
        if users is not None:
            args.users = write_users(self.workdir / "users", users)
        self.repo = ws.test_repository()
        self.providers = (providers_factory or ws.make_test_providers)(self.repo)
        sec = security.prepare(args, listen=[("127.0.0.1", 0)],
                               https=[("127.0.0.1", 0)] if https else [],
                               state_dir=self.workdir / "state", host=ws.TEST_HOST)
        self.handle = self.run(start_server(
            sec.listen, repo=self.repo, host=ws.TEST_HOST, providers=list(self.providers.values()),
            limits=limits, https=sec.https, ssl_context=sec.ssl_context,
            authenticate=sec.authenticate, max_pull_per_client=max_pull_per_client))
        self.port = self.handle.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        if https:
            self.tls_port = self.handle.https_addresses[0][1]
            self.https_url = f"https://127.0.0.1:{self.tls_port}"

    def run(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> dict[str, int]:
        async def get():
            return self.handle.stats()
        return self.run(get())

    def conn(self, user: str | None = None, password: str | None = None, namespace: str = "root/virt",
             https: bool = False) -> pywbem.WBEMConnection:
        creds = None if user is None else (user, password if password is not None
                                           else USERS[user][0])
        return pywbem.WBEMConnection(self.https_url if https else self.url, creds,
                                     default_namespace=namespace, timeout=30,
                                     no_verification=True)

    def stop(self) -> None:
        try:
            self.run(self.handle.close(), 15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def post(port: int, body: bytes | str, headers: dict[str, str], *, tls: bool = False,
         timeout: float = 30) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One POST /cimom on a fresh connection: (status, headers, body)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/cimom", body, headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (or `limit` bytes)."""
    out = b""
    while len(out) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def imethodcall(method: str, params: str = "", ns: str = "root/virt", msg_id: str = "1") -> str:
    nsx = "".join(f'<NAMESPACE NAME="{p}"/>' for p in ns.split("/"))
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{msg_id}" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            f'<IMETHODCALL NAME="{method}"><LOCALNAMESPACEPATH>{nsx}</LOCALNAMESPACEPATH>'
            f'{params}</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>')


def methodcall(method: str, target: str, params: str = "", ns: str = "root/virt") -> str:
    """`target`: a CLASSNAME or INSTANCENAME element (LOCALCLASSPATH / LOCALINSTANCEPATH
    is chosen from it)."""
    nsx = "".join(f'<NAMESPACE NAME="{p}"/>' for p in ns.split("/"))
    wrap = "LOCALINSTANCEPATH" if target.startswith("<INSTANCENAME") else "LOCALCLASSPATH"
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="2" PROTOCOLVERSION="1.0"><SIMPLEREQ><METHODCALL NAME="{method}">'
            f'<{wrap}><LOCALNAMESPACEPATH>{nsx}</LOCALNAMESPACEPATH>{target}</{wrap}>'
            f'{params}</METHODCALL></SIMPLEREQ></MESSAGE></CIM>')


def cim_headers(method: str, obj: str = "root/virt", **extra: str) -> dict[str, str]:
    h = {"Content-Type": 'application/xml; charset="utf-8"', "CIMOperation": "MethodCall",
         "CIMMethod": method, "CIMObject": obj, "CIMProtocolVersion": "1.0"}
    h.update(extra)
    return h


ENUM_NAMES = imethodcall("EnumerateInstanceNames", '<IPARAMVALUE NAME="ClassName">'
                         '<CLASSNAME NAME="VIRT_ComputerSystem"/></IPARAMVALUE>')


def cim_error(body: bytes) -> int | None:
    """The CODE of an ERROR element in a response body, or None."""
    import re
    m = re.search(rb'<ERROR CODE="(\d+)"', body)
    return int(m.group(1)) if m else None


def assert_alive(port: int, headers: dict[str, str] | None = None, tls: bool = False) -> None:
    status, _h, body = post(port, ENUM_NAMES, {**cim_headers("EnumerateInstanceNames"),
                                               **(headers or {})}, tls=tls)
    assert status == 200, body[:300]
    assert cim_error(body) is None and body.count(b"<INSTANCENAME ") == 3, body[:300]
