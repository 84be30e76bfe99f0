"""`cim-provider passwd --users FILE USER [--role reader|operator]`: add or change a user.

The password is read twice: with getpass on a terminal, else as two lines of standard
input (for scripts). Only a salted scrypt hash is stored. The file is replaced
atomically (temporary file, fsync, rename) and is created with mode 0600; an existing
file that group or others can access is refused rather than silently fixed, since its
hashes may already have leaked.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path

from .statefile import write_private
from .server.auth import (ROLES, User, UsersFileError, check_private, format_users, hash_password,
                   parse_users, valid_name)

log = logging.getLogger(__name__)
MIN_PASSWORD = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", required=True, type=Path, metavar="FILE",
                   help="the users file (created with mode 0600 if missing)")
    p.add_argument("user", help="user name (no ':' or blanks)")
    p.add_argument("--role", choices=ROLES, default=None,
                   help="reader: read operations only; operator: also methods and "
                        "subscriptions (default: the user's current role, else reader)")
    p.add_argument("--delete", action="store_true", help="remove the user instead")


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Repeat it: ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
        second = sys.stdin.readline().rstrip("\r\n")
    if first != second:
        raise ValueError("the two passwords differ")
    if len(first) < MIN_PASSWORD:
        raise ValueError(f"the password must have at least {MIN_PASSWORD} characters")
    return first


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: mode 0600 from the first byte, fsync'd, renamed."""
    write_private(path, text.encode("utf-8"))


def update_users_file(path: Path, user: str, password: str | None, role: str | None,
                      delete: bool = False) -> str:
    """Add, change or delete `user`; returns what was done (for the message)."""
    if not valid_name(user):
        raise ValueError(f"invalid user name {user!r}")
    users: dict[str, User] = {}
    if path.exists():
        check_private(path)
        users = parse_users(path.read_text(encoding="utf-8"), str(path))
    if delete:
        if users.pop(user, None) is None:
            raise ValueError(f"{user} is not in {path}")
        write_atomically(path, format_users(users))
        return "deleted"
    old = users.get(user)
    role = role or (old.role if old else "reader")
    users[user] = User(user, role, hash_password(password or ""))
    write_atomically(path, format_users(users))
    return ("changed" if old else "added") + f" (role {role})"


def run(args: argparse.Namespace) -> int:
    try:
        if args.users.exists():
            check_private(args.users)       # refuse before asking for a password
        password = None if args.delete else _read_password()
        what = update_users_file(args.users, args.user, password, args.role, args.delete)
    except (ValueError, UsersFileError, OSError) as exc:
        print(f"cim-provider passwd: {exc}", file=sys.stderr)
        return 1
    print(f"{args.user}: {what} in {args.users}")
    return 0
