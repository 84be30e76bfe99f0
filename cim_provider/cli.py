"""`cim-provider` command line: each subcommand lives in the module that owns it.

A subcommand module offers `add_arguments(parser)` and `run(args) -> int`; it is
imported only when chosen, so `cim-provider manager` never loads the WBEM stack.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

SUBCOMMANDS = {
    "serve": ("cim_provider.server.main", "run the WBEM server"),
    "manager": ("cim_provider.manager.cli", "run the reference org.example.virt.Manager"),
    "demo": ("cim_provider.demo", "serve the embedded demo (private bus, libvirt test driver)"),
    "setup-schema": ("cim_provider.schema_setup",
                     "fetch the DMTF schema into the cache directory and compile the classes"),
    "passwd": ("cim_provider.passwd", "add or change a user in a users file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="cim-provider")
    parser.add_argument("--version", action="version", version=f"cim-provider {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
