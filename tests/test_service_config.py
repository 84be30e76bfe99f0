"""The configuration file (server/config.py) and the global options (cli.py): keys are
the long options without dashes, checked and converted by the options' own argparse
actions; the command line wins; any problem is exit 2 with the file and key named.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

try:
    from tests.support.wbem_server import CIM_PROVIDER, ROOT
except ImportError:
    from support.wbem_server import CIM_PROVIDER, ROOT  # type: ignore

from cim_provider import cli
from cim_provider.server import config

EXAMPLE = ROOT / "contrib" / "cim-provider.toml"


@pytest.fixture(autouse=True)
def _no_machine_config(monkeypatch, tmp_path):
    """Neither the machine's /etc file nor $CIM_PROVIDER_CONFIG: only what a test writes."""
    monkeypatch.delenv("CIM_PROVIDER_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(capsys, argv: list[str]) -> str:
    """The message of a parse that must exit 2."""
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- values -------------------------------------------------------------------------

def test_file_values_are_converted_by_the_options_own_types(tmp_path):
    path = write(tmp_path, """
[serve]
listen = ["127.0.0.1:6000", "[::1]:6001"]
https-listen = ["127.0.0.1:6002"]
manager-timeout = 7            # an integer where a float is expected
max-body = 1024
users = "/etc/cim-provider/users"
insecure-http = true
log-level = "debug"
pam-role = "operator"
""")
    args = cli.parse_args(["--config", str(path), "serve"])
    assert args.listen == [("127.0.0.1", 6000), ("::1", 6001)]
    assert args.https_listen == [("127.0.0.1", 6002)]
    assert args.manager_timeout == 7.0 and isinstance(args.manager_timeout, float)
    assert args.max_body == 1024
    assert args.users == Path("/etc/cim-provider/users")
    assert args.insecure_http is True and args.pam_role == "operator"
    assert args.log_level == "DEBUG"
    assert args.config == path
    # untouched options keep their defaults
    assert args.manager_bus == "system" and args.max_connections == 256


def test_command_line_wins_and_replaces_repeatable_options(tmp_path):
    path = write(tmp_path, """
[serve]
listen = ["127.0.0.1:6000", "127.0.0.1:6001"]
manager-timeout = 7.0
insecure-http = false
log-level = "debug"
""")
    args = cli.parse_args(["serve", "--config", str(path), "--listen", "127.0.0.1:7000",
                           "--manager-timeout", "5", "--insecure-http", "--log-level", "error"])
    assert args.listen == [("127.0.0.1", 7000)]          # not merged with the file's
    assert args.manager_timeout == 5.0
    assert args.insecure_http is True
    assert args.log_level == "ERROR"
    # a global option before the subcommand is the command line too
    args = cli.parse_args(["--log-level", "warning", "--config", str(path), "serve"])
    assert args.log_level == "WARNING" and args.manager_timeout == 7.0


def test_explicit_default_on_the_command_line_still_wins(tmp_path):
    path = write(tmp_path, "[serve]\nmanager-timeout = 9.0\nmanager-bus = \"session\"\n")
    args = cli.parse_args(["serve", "--config", str(path), "--manager-timeout", "5.0",
                           "--manager-bus", "system"])
    assert args.manager_timeout == 5.0 and args.manager_bus == "system"


def test_manager_section(tmp_path):
    path = write(tmp_path, """
[serve]
listen = ["127.0.0.1:6000"]
[manager]
bus = "session"                # the older name of manager-bus
store = ["sqlite:/tmp/a.db", "libvirt:test:///default"]
poll-interval = 0.5
log-level = "Warning"
""")
    args = cli.parse_args(["manager", "--config", str(path)])
    assert args.bus == "session" and args.poll_interval == 0.5
    assert args.store == ["sqlite:/tmp/a.db", "libvirt:test:///default"]
    assert args.log_level == "WARNING"
    assert not hasattr(args, "listen")


def test_default_file_is_read_when_it_exists(tmp_path, monkeypatch):
    default = write(tmp_path, "[serve]\nmax-connections = 9\n", "default.toml")
    monkeypatch.setattr(config, "DEFAULT_PATH", default)
    args = cli.parse_args(["serve"])
    assert args.max_connections == 9 and args.config == default
    # $CIM_PROVIDER_CONFIG="" turns the default file off
    monkeypatch.setenv("CIM_PROVIDER_CONFIG", "")
    args = cli.parse_args(["serve"])
    assert args.max_connections == 256 and args.config is None


def test_no_file_no_problem():
    args = cli.parse_args(["serve"])
    assert args.config is None and args.log_level == "INFO"


def test_a_new_option_needs_no_code(tmp_path):
    """Keys are looked up in the parser: an option nobody told config.py about works."""
    p = argparse.ArgumentParser()
    p.add_argument("--frobnication-level", type=int, choices=[1, 2, 3], default=1)
    p.add_argument("--widget", action="append", type=Path)
    p.add_argument("--no-gadgets", action="store_false", dest="gadgets")
    got = config.section_values(Path("x.toml"), {"serve": {
        "frobnication-level": 3, "widget": ["/a", "/b"], "no-gadgets": True}}, "serve", p)
    assert got == {"frobnication_level": 3, "widget": [Path("/a"), Path("/b")],
                   "gadgets": False}
    with pytest.raises(config.ConfigError, match=r"frobnication-level: 4 is not one of 1, 2, 3"):
        config.section_values(Path("x.toml"), {"serve": {"frobnication-level": 4}}, "serve", p)


# --- global options -----------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--log-level", "debug", "manager"],
    ["manager", "--log-level", "debug"],
    ["--log-level", "DeBuG", "manager"],
    ["--log-level", "error", "manager", "--log-level", "Debug"],   # the later one wins
])
def test_log_level_before_or_after_the_subcommand_any_case(argv):
    assert cli.parse_args(argv).log_level == "DEBUG"


@pytest.mark.parametrize("argv", [["--log-target", "journal", "passwd", "--users", "u", "x"],
                                  ["passwd", "--users", "u", "x", "--log-target", "journal"]])
def test_log_target_before_or_after(argv):
    assert cli.parse_args(argv).log_target == "journal"


def test_bad_log_level_is_refused(capsys):
    assert "invalid choice" in refused(capsys, ["serve", "--log-level", "loud"])


def test_config_only_for_serve_and_manager(capsys, tmp_path):
    path = write(tmp_path, "[serve]\n")
    assert "--config applies to serve and manager" in refused(
        capsys, ["--config", str(path), "demo"])


# --- refusals -----------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("[serve]\nbogus = 1\n", r"\[serve\] unknown key 'bogus'"),
    ("[serve]\nmanager-timeout = \"five\"\n", r"\[serve\] manager-timeout: expected a number, got 'five'"),
    ("[serve]\nmax-body = 1.5\n", r"\[serve\] max-body: expected an integer, got 1.5"),
    ("[serve]\nmax-body = true\n", r"\[serve\] max-body: expected an integer, got true"),
    ("[serve]\nlisten = \"127.0.0.1:1\"\n", r"\[serve\] listen: expected an array"),
    ("[serve]\nlisten = [\"nope\"]\n", r"\[serve\] listen\[0\]: .*'nope'"),
    ("[serve]\nmanager-bus = [\"system\"]\n", r"\[serve\] manager-bus: expected a string, got an array"),
    ("[serve]\ninsecure-http = \"yes\"\n", r"\[serve\] insecure-http: expected true or false"),
    ("[serve]\nlog-level = \"loud\"\n", r"\[serve\] log-level: 'loud' is not one of DEBUG"),
    ("[serve]\npam-role = \"admin\"\n", r"\[serve\] pam-role: 'admin' is not one of reader, operator"),
    ("[serve]\nconfig = \"/etc/other.toml\"\n", r"\[serve\] unknown key 'config'"),
    ("[serve]\nversion = true\n", r"\[serve\] unknown key 'version'"),
    ("[daemon]\nx = 1\n", r"unknown section 'daemon'"),
    ("listen = [\"127.0.0.1:1\"]\n", r"unknown key 'listen'"),
    ("[serve\n", r"not valid TOML"),
    ("[serve]\nlisten = [\n", r"not valid TOML"),
])
def test_refused_with_the_file_and_key_named(capsys, tmp_path, text, message):
    path = write(tmp_path, text)
    err = refused(capsys, ["serve", "--config", str(path)])
    assert str(path) in err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_two_names_of_one_option(capsys, tmp_path):
    path = write(tmp_path, "[manager]\nbus = \"session\"\nmanager-bus = \"system\"\n")
    assert "[manager] manager-bus and bus are the same option" in refused(
        capsys, ["manager", "--config", str(path)])


def test_manager_table_is_checked_for_manager(capsys, tmp_path):
    path = write(tmp_path, "[manager]\nlisten = [\"127.0.0.1:1\"]\n")
    assert "[manager] unknown key 'listen'" in refused(capsys, ["manager", "--config", str(path)])


def test_missing_and_unreadable_files(capsys, tmp_path):
    err = refused(capsys, ["serve", "--config", str(tmp_path / "missing.toml")])
    assert f"cannot read the configuration file {tmp_path / 'missing.toml'}" in err
    err = refused(capsys, ["manager", "--config", str(tmp_path)])     # a directory
    assert f"cannot read the configuration file {tmp_path}" in err
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[serve]\nlibvirt-uri = \"\xe9\"\n")
    assert "not valid TOML" in refused(capsys, ["serve", "--config", str(bad)])


def test_the_real_command_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "[serve]\nmax-connections = \"many\"\n")
    for argv in (["--config", str(path), "serve"], ["manager", "--config", str(tmp_path / "no")]):
        proc = subprocess.run([str(CIM_PROVIDER), *argv], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, proc
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cim-provider: "), proc.stderr
        assert "Traceback" not in proc.stderr


# --- the example file ---------------------------------------------------------------

def _uncommented(text: str) -> str:
    """The example with every `# key = value` line switched on."""
    lines = []
    for line in text.splitlines():
        m = re.match(r"^# ([a-z][a-z0-9-]*) = (.*)$", line)
        lines.append(f"{m.group(1)} = {m.group(2)}" if m else line)
    return "\n".join(lines) + "\n"


def test_example_config_sets_nothing_as_shipped():
    import tomllib
    assert tomllib.loads(EXAMPLE.read_text()) == {"serve": {}, "manager": {}}


@pytest.mark.parametrize("command", ["serve", "manager"])
def test_example_config_lists_every_option_and_is_valid(command, tmp_path):
    import tomllib
    data = tomllib.loads(_uncommented(EXAMPLE.read_text()))
    _parser, subparsers = cli.build_parser([command])
    options = config.file_options(subparsers[command])
    main_names = {config.option_keys(a)[0] for a in options.values()}
    assert sorted(data[command]) == sorted(main_names), "every option, and nothing else"
    values = config.section_values(EXAMPLE, data, command, subparsers[command])
    assert len(values) == len(main_names)
