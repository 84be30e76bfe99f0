"""Command-line options for exposure, authentication, TLS and limits, shared by
`serve` and `demo`, and the start-up rules that keep a careless set-up off the network:

- plain HTTP only on loopback addresses, unless `--insecure-http`;
- no listener beyond loopback without authentication (`--users` or `--pam-service`);
- HTTPS without `--cert` uses a self-signed pair from the state directory, made on
  first use.

Without `--users`/`--pam-service` on loopback there is no authentication and every
client is an operator (a local-only development set-up).
"""
from __future__ import annotations

import argparse
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .auth import ROLES, Authenticator, FailureBrake, UsersFile, UsersFileError, pam_checker
from .http import DEFAULT_MAX_BODY, HTTPLimits
from .listen import is_loopback, parse_listen
from ..wbem.pull import MAX_CONTEXTS_PER_CLIENT
from .tls import ensure_self_signed, server_context

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A configuration the server refuses to start with; the message says why."""


def add_arguments(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    default_https = "127.0.0.1:5989" if demo else "none"
    p.add_argument("--https-listen", action="append", type=parse_listen, metavar="HOST:PORT",
                   help=f"address to serve HTTPS on (repeatable; conventional port 5989; "
                        f"default {default_https})")
    p.add_argument("--cert", type=Path, default=None,
                   help="PEM certificate (chain) for HTTPS; default: a self-signed one "
                        "created in the state directory on first use")
    p.add_argument("--key", type=Path, default=None,
                   help="PEM private key for --cert (default: in the --cert file)")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow plain HTTP on addresses other than loopback")
    p.add_argument("--users", type=Path, default=None, metavar="FILE",
                   help="users file for HTTP Basic authentication (see cim-provider passwd)")
    p.add_argument("--pam-service", default=None, metavar="NAME",
                   help="also authenticate through this PAM service (needs python-pam)")
    p.add_argument("--pam-role", choices=ROLES, default="reader",
                   help="role of users authenticated by PAM (default reader)")
    if demo:
        return
    p.add_argument("--max-header-size", type=int, default=8190, metavar="BYTES",
                   help="longest request line or header field (default 8190)")
    p.add_argument("--max-headers", type=int, default=64,
                   help="most header fields in a request (default 64)")
    p.add_argument("--keepalive-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="close a connection idle this long between requests (default 15)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's head, then its body, must each arrive within this "
                        "(default 30)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="connections open at once; more are answered 503 (default 256)")
    p.add_argument("--max-pull-contexts", type=int, default=MAX_CONTEXTS_PER_CLIENT,
                   metavar="N", help="open enumeration contexts per client "
                                     f"(default {MAX_CONTEXTS_PER_CLIENT})")
    p.add_argument("--max-xml-depth", type=int, default=64, metavar="N",
                   help="deepest XML nesting accepted in a request (default 64)")
    p.add_argument("--login-burst", type=int, default=5, metavar="N",
                   help="failed logins an address may make at once before it gets 429 "
                        "(default 5; then one more every --login-refill seconds)")
    p.add_argument("--login-refill", type=float, default=2.0, metavar="SECONDS",
                   help="seconds to regain one failed-login allowance (default 2)")


def limits_from_args(args: argparse.Namespace) -> HTTPLimits:
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
    """Check the exposure rules and build TLS and authentication; StartupError if not."""
    sec = Security(list(listen), list(https))
    if not getattr(args, "insecure_http", False):
        for h, p in sec.listen:
            if not is_loopback(h):
                raise StartupError(f"plain HTTP on {h}:{p} would send passwords and data in "
                                   f"clear; use --https-listen, or --insecure-http")
    users = getattr(args, "users", None)
    pam_service = getattr(args, "pam_service", None)
    if users is not None or pam_service:
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
        exposed = [f"{h}:{p}" for h, p in sec.listen + sec.https if not is_loopback(h)]
        if exposed:
            raise StartupError(f"{', '.join(exposed)} is not loopback: refusing to serve it "
                               f"without authentication (give --users or --pam-service)")
        log.warning("no authentication: every local client is an operator")
    if sec.https:
        cert, key = getattr(args, "cert", None), getattr(args, "key", None)
        try:
            if cert is None:
                if state_dir is None:
                    raise StartupError("HTTPS without --cert needs a state directory")
                cert, key = ensure_self_signed(Path(state_dir) / "tls", host)
                log.info("HTTPS uses the self-signed certificate %s", cert)
            sec.ssl_context = server_context(cert, key)
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            raise StartupError(f"cannot set up TLS: {exc}") from None
    return sec
