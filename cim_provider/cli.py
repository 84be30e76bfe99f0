"""`cim-provider` command line: each subcommand lives in the module that owns it.

A subcommand module offers `add_arguments(parser)` and `run(args) -> int`; it is
imported only when chosen, so `cim-provider manager` never loads the WBEM stack.

Global options -- `--log-level`, `--log-target` and `--config` -- are accepted before
or after the subcommand (`cim-provider --log-level debug serve` and `cim-provider serve
--log-level debug`); the one given later wins. `serve` and `manager` also read their
table of the configuration file (server/config.py); the command line wins over it, and
`args.reread_config()` reads it again (SIGHUP).
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from . import __version__, logsetup

SUBCOMMANDS = {
    "serve": ("cim_provider.server.main", "run the WBEM server"),
    "manager": ("cim_provider.manager.cli", "run the reference org.example.virt.Manager"),
    "demo": ("cim_provider.demo", "serve the embedded demo (private bus, libvirt test driver)"),
    "setup-schema": ("cim_provider.schema_setup",
                     "fetch the DMTF schema into the cache directory and compile the classes"),
    "passwd": ("cim_provider.passwd", "add or change a user in a users file"),
}
# the global options that take a value (to find the subcommand behind them)
_GLOBAL_WITH_VALUE = ("--log-level", "--log-target", "--config")


def _add_global_options(p: argparse.ArgumentParser, *, config: bool, top: bool) -> None:
    """On the top parser with real defaults; on a subparser with suppressed ones, so
    that a subcommand that is not given the option keeps the top parser's value."""
    def default(value: str | None) -> str | None:
        return value if top else argparse.SUPPRESS
    p.add_argument("--log-level", type=logsetup.level_name, choices=logsetup.LEVELS,
                   default=default("INFO"), metavar="LEVEL",
                   help="debug, info (default), warning or error (any case)")
    p.add_argument("--log-target", choices=logsetup.TARGETS, default=default(None),
                   help="stderr, journal (journald's native protocol) or syslog (/dev/log); "
                        "default: the journal when stderr is connected to it, else stderr")
    if config:
        p.add_argument("--config", type=str, default=default(None), metavar="FILE",
                       help="TOML configuration file, tables [serve] and [manager] (default "
                            "/etc/cim-provider/cim-provider.toml when it exists); the command "
                            "line wins over it")


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand in `argv`, skipping the global options in front of it."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg if arg in SUBCOMMANDS else None
    return None


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser,
                                           dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="cim-provider")
    parser.add_argument("--version", action="version", version=f"cim-provider {__version__}")
    _add_global_options(parser, config=True, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = chosen_command(argv)
    subparsers = {}
    from .server.config import SECTIONS
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        _add_global_options(p, config=name in SECTIONS, top=False)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
        subparsers[name] = p
    return parser, subparsers


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options of this run: command line, then configuration file, then defaults.
    A bad command line or configuration file exits 2 with a message (no traceback)."""
    from .server.config import SECTIONS, CommandLine, ConfigError
    parser, subparsers = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command not in SECTIONS:
        if args.config is not None:
            parser.error(f"--config applies to {' and '.join(SECTIONS)}, not {args.command}")
        return args
    try:
        return CommandLine(parser, subparsers[args.command], argv, args.command).parse()
    except ConfigError as exc:
        parser.exit(2, f"cim-provider: {exc}\n")


def _sighup_while_starting(_sig: int, _frame: object) -> None:
    """`serve` and `manager` reload on SIGHUP once running; until then a SIGHUP (whose
    default is to terminate) is ignored rather than kill a starting service."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if chosen_command(argv) in ("serve", "manager"):
        signal.signal(signal.SIGHUP, _sighup_while_starting)
    args = parse_args(argv)
    try:
        logsetup.configure(args.log_level, args.log_target)
    except OSError as exc:
        print(f"cim-provider: cannot log to {args.log_target}: {exc}", file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
