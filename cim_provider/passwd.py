"""`cim-provider passwd --users FILE`: add, change, delete or list the users of a users
file.

    cim-provider passwd --users FILE USER [--role reader|operator] [--password-stdin]
    cim-provider passwd --users FILE --delete USER
    cim-provider passwd --users FILE --list

The password is never an argument (it would show in `ps` and the shell's history): it
is asked twice with getpass on a terminal; with `--password-stdin` it is one line of
standard input (`printf '%s\\n' "$PW" | cim-provider passwd ... --password-stdin`); from
standard input that is not a terminal without the option, two lines (the password and
its repetition). Only a salted scrypt hash is stored, and `--list` shows names and
roles, never hashes. The file is replaced atomically (temporary file, fsync, rename)
and is created with mode 0600; an existing file that group or others can access is
refused rather than silently fixed, since its hashes may already have leaked.
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

DESCRIPTION = """\
Add a user or change their password or role (USER), delete a user (--delete USER) or
list the users and their roles (--list) in a users file for `serve --users`.
The password is never given as an argument: it is asked twice on a terminal (not
shown); with --password-stdin it is read as one line of standard input; from standard
input that is not a terminal, without --password-stdin, as two lines (the password,
then the same again). It needs at least 8 characters. Only a salted scrypt hash is
stored; the file is created with mode 0600."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--users", required=True, type=Path, metavar="FILE",
                   help="the users file (created with mode 0600 if missing; required)")
    p.add_argument("user", nargs="?", metavar="USER",
                   help="user to add or change (no ':' or blanks)")
    p.add_argument("--role", choices=ROLES, default=None,
                   help="reader: read operations only; operator: also methods and "
                        "subscriptions (default: the user's current role, else reader)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password as one line of standard input, without "
                        "repetition (default: asked twice on a terminal, else two lines "
                        "of standard input)")
    p.add_argument("--delete", nargs="?", const=True, default=None, metavar="USER",
                   help="delete USER (`--delete USER`, or USER --delete); a user that "
                        "is not in the file is an error (default: add or change)")
    p.add_argument("--list", action="store_true",
                   help="list the users and their roles, one per line (never the "
                        "hashes) (default: add or change)")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        first = sys.stdin.readline()
        if not first:
            raise ValueError("--password-stdin: standard input is empty")
        first = second = first.rstrip("\r\n")
    elif sys.stdin.isatty():
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


def read_users(path: Path) -> dict[str, User]:
    """The users of an existing file (checked private first)."""
    check_private(path)
    return parse_users(path.read_text(encoding="utf-8"), str(path))


def update_users_file(path: Path, user: str, password: str | None, role: str | None,
                      delete: bool = False) -> str:
    """Add, change or delete `user`; returns what was done (for the message)."""
    if not valid_name(user):
        raise ValueError(f"invalid user name {user!r}")
    users: dict[str, User] = {}
    if path.exists():
        users = read_users(path)
    elif delete:
        raise ValueError(f"{path} does not exist")
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


def _action(args: argparse.Namespace) -> tuple[str, str | None]:
    """("add" | "delete" | "list", user); ValueError for a contradictory command line."""
    if args.list:
        if args.delete is not None or args.user is not None:
            raise ValueError("--list takes no user and no --delete")
        if args.role is not None or args.password_stdin:
            raise ValueError("--list takes no --role or --password-stdin")
        return "list", None
    if args.delete is not None:
        named = None if args.delete is True else args.delete
        if named is not None and args.user is not None and named != args.user:
            raise ValueError(f"--delete {named} and {args.user}: which one?")
        user = named or args.user
        if user is None:
            raise ValueError("--delete needs a user")
        if args.role is not None or args.password_stdin:
            raise ValueError("--delete takes no --role or --password-stdin")
        return "delete", user
    if args.user is None:
        raise ValueError("give a USER to add or change, --delete USER or --list")
    return "add", args.user


def run(args: argparse.Namespace) -> int:
    try:
        action, user = _action(args)
    except ValueError as exc:
        print(f"cim-provider passwd: {exc}", file=sys.stderr)
        return 2
    try:
        if action == "list":
            if not args.users.exists():
                raise ValueError(f"{args.users} does not exist")
            for u in read_users(args.users).values():
                print(f"{u.name} {u.role}")
            return 0
        assert user is not None
        if args.users.exists():
            check_private(args.users)       # refuse before asking for a password
        if action == "delete":
            what = update_users_file(args.users, user, None, None, delete=True)
        else:
            if not valid_name(user):
                raise ValueError(f"invalid user name {user!r}")
            password = _read_password(args.password_stdin)
            what = update_users_file(args.users, user, password, args.role)
    except (ValueError, UsersFileError, OSError) as exc:
        print(f"cim-provider passwd: {exc}", file=sys.stderr)
        return 1
    print(f"{user}: {what} in {args.users}")
    return 0
