"""The command line a user expects: `serve` and `manager` share option names
(`--manager-bus`; the manager's older `--bus` still works), options are grouped in
`--help`, every number carries its unit in the metavar and every option says its
default."""
from __future__ import annotations

import argparse
import subprocess

import pytest

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

from cim_provider import cli
from cim_provider.server.listen import parse_listen

pytestmark = pytest.mark.timeout(120)

UNITS = {"SECONDS", "BYTES", "COUNT", "KIB"}


def subparser(name: str) -> argparse.ArgumentParser:
    _top, subs = cli.build_parser([name])
    return subs[name]


def help_of(name: str) -> str:
    p = subprocess.run([str(ws.CIM_PROVIDER), name, "--help"], capture_output=True,
                       text=True, timeout=60, env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return p.stdout


def valued_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs != 0
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_units_in_metavars_and_defaults_shown(name):
    for action in valued_options(subparser(name)):
        opt = action.option_strings[0]
        assert action.metavar is not None or action.choices is not None, opt
        if action.type in (int, float):
            assert action.metavar in UNITS, f"{name} {opt}: {action.metavar}"
        if action.type is parse_listen:
            assert action.metavar == "HOST:PORT", opt
        if not action.required:
            assert "default" in (action.help or ""), f"{name} {opt} does not say its default"


def test_help_shows_expanded_defaults():
    text = " ".join(help_of("serve").split())
    assert "(default: %(default)s)" not in text
    for shown in ("--max-body BYTES largest request body; larger ones get 413 (default: "
                  "16777216, 16 MiB)",
                  "--read-timeout SECONDS", "(default: 30.0)", "--max-connections COUNT",
                  "--manager-bus system|session|ADDRESS", "(default: system)",
                  "--login-refill SECONDS", "--audit-log FILE"):
        assert shown in text, shown


@pytest.mark.parametrize("name,groups", [
    ("serve", ["listeners:", "TLS:", "authentication:", "limits:", "sources:", "files:",
               "logging:"]),
    ("manager", ["bus:", "stores:"]),
    ("demo", ["listeners:", "TLS:", "authentication:"]),
])
def test_options_are_grouped(name, groups):
    lines = help_of(name).splitlines()
    for g in groups:
        assert g in lines, f"{name} --help has no group {g}"
    if name == "serve":
        section = {}
        current = None
        for line in lines:
            if line and not line.startswith(" ") and line.endswith(":"):
                current = line[:-1]
            elif line.startswith("  --") and current:
                section[line.split()[0]] = current
        assert section["--listen"] == section["--https-listen"] == "listeners"
        assert section["--cert"] == section["--key"] == "TLS"
        assert section["--users"] == section["--login-burst"] == "authentication"
        assert section["--max-body"] == section["--read-timeout"] == "limits"
        assert section["--manager-bus"] == section["--libvirt-uri"] == "sources"
        assert section["--audit-log"] == "logging"


def test_serve_and_manager_share_manager_bus():
    serve = {s for a in subparser("serve")._actions for s in a.option_strings}
    manager = {s for a in subparser("manager")._actions for s in a.option_strings}
    assert {"--manager-bus", "--libvirt-uri"} <= serve & manager
    p = subparser("manager")
    assert p.parse_args(["--manager-bus", "session"]).bus == "session"
    assert p.parse_args(["--bus", "unix:path=/x"]).bus == "unix:path=/x"   # the old name
    assert p.parse_args([]).bus == "system"
    assert subparser("serve").parse_args(["--manager-bus", "session"]).manager_bus == "session"


def test_manager_bus_on_the_real_command(tmp_path):
    """Both spellings reach the Manager: a bus address nobody serves fails the same way."""
    for option in ("--manager-bus", "--bus"):
        p = subprocess.run([str(ws.CIM_PROVIDER), "manager", option,
                            f"unix:path={tmp_path}/no-bus", "--store",
                            f"sqlite:{tmp_path}/m.db"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, p.stderr
        assert f"cannot serve the Manager on unix:path={tmp_path}/no-bus" in p.stderr
