"""Command-line options for exposure, authentication, TLS and limits, shared by
`serve` and `demo`, and the start-up rules that keep a careless set-up off the network:

- plain HTTP only on loopback addresses, unless `--insecure-http`;
- no listener beyond loopback without authentication (`--users` or `--pam-service`);
- HTTPS without `--cert` uses a self-signed pair from the state directory, made on
  first use.

Without `--users`/`--pam-service` on loopback there is no authentication and every
client is an operator (a local-only development set-up).

Before anything starts (libvirt, D-Bus), `prepare` also checks what would otherwise fail
later with a traceback or a cryptic OpenSSL message: listener names resolve, each
address can be bound (`127.0.0.1:5988 is already in use`), the state directory and the
audit log can be written, and the TLS files are usable (tls.py names the file and the
problem). Each refusal is a StartupError whose text is the whole message.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .listen import ANY, is_ip_literal, is_loopback, parse_listen, show_address
from .tls import TLSError, ensure_self_signed, server_context

if TYPE_CHECKING:
    from .auth import Authenticator
    from .http import HTTPLimits

log = logging.getLogger(__name__)

# The options import neither aiohttp nor pywbem (`serve` opens libvirt before it imports
# them: server/main.py). So DEFAULT_MAX_BODY lives here (http.py takes it from here),
# and ROLES and MAX_CONTEXTS_PER_CLIENT repeat those of auth.py and wbem/pull.py;
# tests/test_startup_order.py checks that they agree.
DEFAULT_MAX_BODY = 16 * 1024 * 1024     # bytes
ROLES = ("reader", "operator")
MAX_CONTEXTS_PER_CLIENT = 64


class StartupError(Exception):
    """A configuration the server refuses to start with; the message says why."""


class ListenError(StartupError, OSError):
    """A listener that cannot start: str() says which and why, `errno` is the cause's."""

    @classmethod
    def of(cls, exc: OSError, host: str, port: int) -> "ListenError":
        where = show_address(host, port)
        if isinstance(exc, socket.gaierror):
            text = f"{where}: the host name {host} does not resolve ({exc.strerror})"
        elif exc.errno == errno.EADDRINUSE:
            text = f"{where} is already in use"
        elif exc.errno == errno.EADDRNOTAVAIL:
            text = f"{where}: {host} is not an address of this host"
        elif exc.errno == errno.EACCES:
            text = (f"{where}: permission denied (ports below 1024 need root or "
                    f"CAP_NET_BIND_SERVICE)")
        else:
            text = f"{where}: cannot listen there ({exc.strerror or exc})"
        err = cls(text)
        err.errno = exc.errno
        return err


def group(p: argparse.ArgumentParser, title: str,
          description: str | None = None) -> argparse._ArgumentGroup:
    """The argument group `title` of `p` for --help, made on first use, so the options
    of one subject stay together whichever module adds them."""
    for g in p._action_groups:       # argparse has no public lookup by title
        if g.title == title:
            return g
    return p.add_argument_group(title, description)


def add_arguments(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    default_https = "127.0.0.1:5989" if demo else "none"
    listeners = group(p, "listeners")
    listeners.add_argument(
        "--https-listen", action="append", type=parse_listen, metavar="HOST:PORT",
        help=f"address to serve HTTPS on, repeatable; PORT alone is every address, "
             f"IPv4 and IPv6; the conventional port is 5989 (default: {default_https})")
    listeners.add_argument(
        "--insecure-http", action="store_true",
        help="allow plain HTTP on addresses other than loopback (default: refused)")
    tls = group(p, "TLS")
    tls.add_argument("--cert", type=Path, default=None, metavar="FILE",
                     help="PEM certificate (chain) for HTTPS (default: a self-signed one "
                          "created in the state directory on first use)")
    tls.add_argument("--key", type=Path, default=None, metavar="FILE",
                     help="PEM private key of --cert, unencrypted (default: the key in "
                          "the --cert file)")
    auth = group(p, "authentication")
    auth.add_argument("--users", type=Path, default=None, metavar="FILE",
                      help="users file for HTTP Basic authentication, see `cim-provider "
                           "passwd` (default: none; then only loopback is served, and "
                           "every client is an operator)")
    auth.add_argument("--pam-service", default=None, metavar="NAME",
                      help="also authenticate through this PAM service, needs python-pam "
                           "(default: none)")
    auth.add_argument("--pam-role", choices=ROLES, default="reader",
                      help="role of users authenticated by PAM (default: %(default)s)")
    if demo:
        return
    auth.add_argument("--login-burst", type=int, default=5, metavar="COUNT",
                      help="failed logins an address may make at once before it gets 429; "
                           "then one more every --login-refill seconds (default: %(default)s)")
    auth.add_argument("--login-refill", type=float, default=2.0, metavar="SECONDS",
                      help="time to regain one failed-login allowance (default: %(default)s)")
    limits = group(p, "limits")
    limits.add_argument("--max-header-size", type=int, default=8190, metavar="BYTES",
                        help="longest request line or header field (default: %(default)s)")
    limits.add_argument("--max-headers", type=int, default=64, metavar="COUNT",
                        help="most header fields in a request (default: %(default)s)")
    limits.add_argument("--keepalive-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="close a connection idle this long between requests "
                             "(default: %(default)s)")
    limits.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a request's head, then its body, must each arrive within this "
                             "(default: %(default)s)")
    limits.add_argument("--max-connections", type=int, default=256, metavar="COUNT",
                        help="connections open at once; more are answered 503 "
                             "(default: %(default)s)")
    limits.add_argument("--max-pull-contexts", type=int, default=MAX_CONTEXTS_PER_CLIENT,
                        metavar="COUNT", help="open enumeration contexts per client "
                                              "(default: %(default)s)")
    limits.add_argument("--max-xml-depth", type=int, default=64, metavar="COUNT",
                        help="deepest XML nesting accepted in a request, in elements "
                             "(default: %(default)s)")


def limits_from_args(args: argparse.Namespace) -> HTTPLimits:
    from .http import HTTPLimits
    return HTTPLimits(max_body=getattr(args, "max_body", DEFAULT_MAX_BODY),
                      max_depth=args.max_xml_depth, read_timeout=args.read_timeout,
                      max_line_size=args.max_header_size, max_field_size=args.max_header_size,
                      max_headers=args.max_headers, keepalive_timeout=args.keepalive_timeout,
                      max_connections=args.max_connections)


@dataclass
class Security:
    """What start_server needs from the options: listeners, TLS and the auth hook."""
    listen: list[tuple[str, int]] = field(default_factory=list)
    https: list[tuple[str, int]] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    authenticate: Authenticator | None = None


def prepare(args: argparse.Namespace, *, listen: list[tuple[str, int]],
            https: list[tuple[str, int]], state_dir: Path | None, host: str) -> Security:
    """Check the listeners (names resolve, exposure rules), the state directory, and
    build TLS and authentication; StartupError saying what is wrong if not."""
    sec = Security(list(listen), list(https))
    for option, addrs in (("--listen", sec.listen), ("--https-listen", sec.https)):
        for h, p in addrs:
            check_resolves(option, h, p)
    if not getattr(args, "insecure_http", False):
        for h, p in sec.listen:
            if not is_loopback(h):
                raise StartupError(f"plain HTTP on {show_address(h, p)} would send passwords "
                                   f"and data in clear; use --https-listen, or --insecure-http")
    users = getattr(args, "users", None)
    pam_service = getattr(args, "pam_service", None)
    if users is not None or pam_service:
        # Only now: auth.py imports aiohttp, which `serve` would rather import while
        # libvirt opens (server/main.py).
        from .auth import Authenticator, FailureBrake, UsersFile, UsersFileError, pam_checker
        try:
            users_file = UsersFile(users) if users is not None else None
            pam = pam_checker(pam_service) if pam_service else None
        except (OSError, UsersFileError, RuntimeError) as exc:
            raise StartupError(str(exc)) from None
        brake = FailureBrake(getattr(args, "login_burst", 5), getattr(args, "login_refill", 2.0))
        sec.authenticate = Authenticator(users_file, pam, getattr(args, "pam_role", "reader"),
                                         brake)
        log.info("HTTP Basic authentication required (%s)",
                 " and ".join(x for x in (users and f"users file {users}",
                                          pam_service and f"PAM service {pam_service}") if x))
    else:
        exposed = [show_address(h, p) for h, p in sec.listen + sec.https if not is_loopback(h)]
        if exposed:
            raise StartupError(f"{', '.join(exposed)} is not loopback: refusing to serve it "
                               f"without authentication (give --users or --pam-service)")
        log.warning("no authentication: every local client is an operator")
    for h, p in sec.listen + sec.https:
        check_bindable(h, p)
    if state_dir is not None:
        check_writable_dir(Path(state_dir), "--state-dir")
    audit_log = getattr(args, "audit_log", None)
    if audit_log is not None:
        check_appendable(Path(audit_log), "--audit-log")
    cert, key = getattr(args, "cert", None), getattr(args, "key", None)
    if key is not None and cert is None:
        raise StartupError(f"--key {key} needs --cert (the certificate it belongs to)")
    if sec.https:
        try:
            if cert is None:
                if state_dir is None:
                    raise StartupError("HTTPS without --cert needs a state directory")
                cert, key = ensure_self_signed(Path(state_dir) / "tls", host)
                log.info("HTTPS uses the self-signed certificate %s", cert)
            sec.ssl_context = server_context(cert, key)
        except (OSError, ssl.SSLError, RuntimeError, TLSError) as exc:
            raise StartupError(f"cannot set up TLS: {exc}") from None
    return sec


def check_resolves(option: str, host: str, port: int) -> None:
    """StartupError unless `host` is an address, every address, or a name that resolves."""
    if host == ANY or is_ip_literal(host):
        return
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{option} {show_address(host, port)}: the host name {host} does "
                           f"not resolve ({exc.strerror})") from None
    except UnicodeError:
        raise StartupError(f"{option} {show_address(host, port)}: {host!r} is not a valid "
                           f"host name") from None


def check_bindable(host: str, port: int) -> None:
    """ListenError when `host`:`port` cannot be listened on (in use, not an address of
    this host, a privileged port): found before anything starts (libvirt, D-Bus), and
    said plainly. The sockets are bound as asyncio's create_server binds them
    (SO_REUSEADDR, IPv6 only on IPv6 sockets) and closed at once. Port 0 (any free
    port) is not checked."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError.of(exc, host, port) from None
    for family, type_, proto, _name, addr in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, type_, proto)
        except OSError:
            continue               # an address family this host lacks: asyncio skips it too
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise ListenError.of(exc, host, port) from None


def check_appendable(path: Path, option: str) -> None:
    """StartupError unless `path` can be opened for appending (created 0600 if missing)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"{option} {path}: cannot open it for appending "
                           f"({exc.strerror})") from None
    os.close(fd)


def check_writable_dir(path: Path, option: str) -> None:
    """StartupError unless `path` is (or can be made, mode 0700) a directory this process
    can create files in; tried for real, so a read-only file system counts too."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise StartupError(f"{option} {path} is not a directory") from None
    except OSError as exc:
        raise StartupError(f"{option} {path} cannot be created ({exc.strerror})") from None
    if not path.is_dir():
        raise StartupError(f"{option} {path} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StartupError(f"{option} {path} is not writable ({exc.strerror}): give a "
                           f"directory this user ({os.geteuid()}) can write") from None
