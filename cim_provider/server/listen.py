"""Listener addresses: how `--listen` values are read, how they are shown, and which
ones stay on this host."""
from __future__ import annotations

import argparse
import ipaddress

ANY = ""          # every address of the host, IPv4 and IPv6 (asyncio's create_server)


def parse_listen(value: str) -> tuple[str, int]:
    """PORT (every address, as sfcbd's port), HOST:PORT or [IPv6]:PORT; `:PORT` is
    127.0.0.1. A port outside 1..65535 is refused here, at parse time."""
    if value.strip().isdigit():
        host, port = ANY, value.strip()
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected PORT, HOST:PORT or [IPv6]:PORT, "
                                             f"got {value!r}")
        if host.startswith("[") != host.endswith("]"):
            raise argparse.ArgumentTypeError(f"unbalanced brackets in {value!r}: "
                                             f"[IPv6]:PORT")
        host = host.strip("[]") or "127.0.0.1"
    number = int(port)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} of {value!r} is outside 1..65535")
    return host, number


def show_address(host: str, port: int) -> str:
    """HOST:PORT for messages: [IPv6]:PORT, *:PORT for every address."""
    if host == ANY:
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False      # a name other than localhost, "", 0.0.0.0, :: : assume exposed
