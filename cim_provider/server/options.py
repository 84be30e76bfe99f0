"""The options of `cim-provider serve`, apart from the server itself.

cli.py builds the parser before anything runs; `serve` then starts libvirt's open
before it imports aiohttp and the rest of the server (server/main.py, issue 16), so
these definitions import nothing heavy: the option groups shared with `demo` come from
security.py, the cache directory from schema_setup.py, and --state-dir's default is
worked out here (indications/subscriptions.py imports aiohttp).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import security
from ..schema_setup import add_cache_dir_argument
from .listen import parse_listen


def default_state_dir() -> Path:
    """--state-dir's default: /var/lib/cim-provider for root, else
    $XDG_STATE_HOME/cim-provider."""
    if os.geteuid() == 0:
        return Path("/var/lib/cim-provider")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return Path(base) / "cim-provider"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import __version__
    p.add_argument("--version", action="version", version=f"cim-provider {__version__}")
    listeners = security.group(p, "listeners")
    listeners.add_argument(
        "--listen", action="append", type=parse_listen, metavar="HOST:PORT",
        help="address to serve plain HTTP on, repeatable; PORT alone is every address, "
             "IPv4 and IPv6, which needs --insecure-http and authentication (default: "
             "127.0.0.1:5988 unless --https-listen is given)")
    security.add_arguments(p)
    security.group(p, "TLS").add_argument(
        "--insecure-listeners", action="store_true",
        help="send a listener destination's username and password to an HTTPS listener "
             "whose certificate does not verify (default: such indications are not sent; "
             "listeners without credentials are never verified)")
    limits = security.group(p, "limits")
    limits.add_argument("--max-body", type=int, default=security.DEFAULT_MAX_BODY, metavar="BYTES",
                        help="largest request body; larger ones get 413 "
                             "(default: %(default)s, 16 MiB)")
    sources = security.group(p, "sources")
    sources.add_argument("--libvirt-uri", default=None, metavar="URI",
                         help="libvirt URI of the running domains (default: "
                              "$LIBVIRT_DEFAULT_URI, else libvirt's own default)")
    sources.add_argument("--manager-bus", default="system", metavar="system|session|ADDRESS",
                         help="bus of org.example.virt.Manager; honours "
                              "$DBUS_SYSTEM_BUS_ADDRESS / $DBUS_SESSION_BUS_ADDRESS "
                              "(default: %(default)s)")
    sources.add_argument("--libvirt-timeout", type=float, default=10.0, metavar="SECONDS",
                         help="time before a libvirt call fails (an action, a read of one "
                              "domain; a full read at connect gets at least 60 s); a call "
                              "that times out is still followed, its domain read again "
                              "(default: %(default)s)")
    sources.add_argument("--manager-timeout", type=float, default=5.0, metavar="SECONDS",
                         help="time before a Manager call fails (default: %(default)s)")
    sources.add_argument("--manager-start-timeout", type=float, default=60.0,
                         metavar="SECONDS",
                         help="time before a StartDomain call to the Manager fails: it "
                              "answers once the guest runs; this bounds the D-Bus call "
                              "only, not the guest's start in libvirt (default: "
                              "%(default)s)")
    sources.add_argument("--manager-list-timeout", type=float, default=60.0,
                         metavar="SECONDS",
                         help="time before a listing call (ListDomains, ListInactiveDomains) "
                              "fails; a listing carries every definition, so it gets longer "
                              "than other calls, and one that times out is tried again at "
                              "once (default: %(default)s)")
    sources.add_argument("--manager-relist", type=float, default=5.0, metavar="SECONDS",
                         help="time between re-reads of a Manager without signals "
                              "(default: %(default)s)")
    sources.add_argument("--sync-wait", type=float, default=2.0, metavar="SECONDS",
                         help="how long RequestStateChange waits for the change to show "
                              "before it answers 4096 (Job Started) with a VIRT_ConcreteJob "
                              "to poll (default: %(default)s)")
    sources.add_argument("--shutdown-timeout", type=float, default=300.0, metavar="SECONDS",
                         help="how long a shutdown, reboot or start job waits for libvirt to "
                              "show the guest shut off, rebooted or running before it ends "
                              "in Exception (default: %(default)s)")
    sources.add_argument("--metrics-interval", type=float, default=10.0, metavar="SECONDS",
                         help="time between usage samples of the running domains (CPU, "
                              "memory, disk and network, read in slices of 250 domains; the "
                              "first one interval after connect; longer while a driver without "
                              "bulk statistics takes more than a fifth of it to answer); 0 "
                              "turns metrics off "
                              "(default: %(default)s)")
    files = security.group(p, "files")
    add_cache_dir_argument(files)
    files.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                       help="where indication subscriptions and the self-signed TLS pair "
                            "are kept; must be writable (default: /var/lib/cim-provider as "
                            "root, else $XDG_STATE_HOME/cim-provider)")
    logs = security.group(p, "logging")
    logs.add_argument("--audit-log", type=Path, default=None, metavar="FILE",
                      help="also append every modifying operation (methods, instance "
                           "writes) to FILE as a JSON line; created with mode 0600, "
                           "reopened on SIGHUP (default: none; the records still go to the "
                           "log, logger cim_provider.audit)")
