"""The configuration file (`--config FILE`, default /etc/cim-provider/cim-provider.toml
when it exists): TOML, one table per subcommand that has one (`[serve]`, `[manager]`),
one key per long option of that subcommand, named like the option without its dashes:

    [serve]
    https-listen = ["0.0.0.0:5989"]     # a repeatable option takes an array
    manager-timeout = 5.0
    insecure-http = false               # a flag takes true or false
    log-level = "debug"

Nothing here knows the options: keys are checked against the subcommand's argparse
actions and converted with each action's own `type` and `choices`, so a new option can
be set in the file without code here. The command line wins over the file: an option
given there is never taken from the file (a repeatable one is not merged either).
Any problem -- a file that cannot be read or parsed, an unknown section or key, a value
of the wrong type -- is a ConfigError naming the file and the key.

$CIM_PROVIDER_CONFIG, when set, replaces the default path; set to "" it turns the
default file off (tests, and packagers who want no implicit file).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

DEFAULT_PATH = Path("/etc/cim-provider/cim-provider.toml")
SECTIONS = ("serve", "manager")
# options that make no sense in the file
NOT_IN_FILE = {"config", "help", "version"}
# attributes cli.py adds to the parsed namespace, not options
INTERNAL = {"command", "config", "reread_config"}


class ConfigError(Exception):
    """An unusable configuration file; str() names the file and the key."""


def option_keys(action: argparse.Action) -> list[str]:
    """The file keys of an option (`--https-listen` -> `https-listen`; every long name
    of an option with several), the first one its main name."""
    return [s[2:] for s in action.option_strings if s.startswith("--")]


def file_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key -> action for every long option `parser` accepts that the file may set."""
    out = {}
    for action in parser._actions:
        if action.dest in NOT_IN_FILE \
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for key in option_keys(action):
            if key not in NOT_IN_FILE:
                out[key] = action
    return out


def _type_name(action: argparse.Action) -> str:
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    return "a string"


def _one(where: str, action: argparse.Action, value: Any) -> Any:
    """One value converted as argparse would convert it from the command line."""
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected {_type_name(action)}, got {_toml_repr(value)}")
    if action.type is int:
        if not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_toml_repr(value)}")
        out: Any = value
    elif action.type is float:
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_toml_repr(value)}")
        out = float(value)
    else:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_toml_repr(value)}")
        out = value
        if callable(action.type):
            try:
                out = action.type(value)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                text = str(exc) or "invalid value"
                if repr(value) not in text:
                    text += f" ({value!r})"
                raise ConfigError(f"{where}: {text}") from None
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return out


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def convert(where: str, action: argparse.Action, value: Any) -> Any:
    """The namespace value for `value` from the file (ConfigError if it does not fit)."""
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_toml_repr(value)}")
        return value
    if isinstance(action, argparse._StoreConstAction):     # store_true/false/const
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_toml_repr(value)}")
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a count, got {_toml_repr(value)}")
        return value
    if type(action) not in (argparse._StoreAction, argparse._AppendAction):
        raise ConfigError(f"{where}: cannot be set in a configuration file")
    many = isinstance(action, argparse._AppendAction) \
        or action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if not many:
        return _one(where, action, value)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected an array (it is a repeatable option), "
                          f"got {_toml_repr(value)}")
    return [_one(f"{where}[{i}]", action, v) for i, v in enumerate(value)]


def read(path: Path) -> dict[str, Any]:
    import tomllib                      # only with a configuration file (~10 ms otherwise)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: "
                          f"{exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def section_values(path: Path, data: dict[str, Any], command: str,
                   parser: argparse.ArgumentParser) -> dict[str, Any]:
    """dest -> value for `command`'s table of the file, checked against `parser`."""
    for key, value in data.items():
        if key not in SECTIONS:
            raise ConfigError(f"{path}: unknown {'section' if isinstance(value, dict) else 'key'} "
                              f"{key!r} (sections: {', '.join(f'[{s}]' for s in SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key!r} must be a section ([{key}])")
    table = data.get(command, {})
    options = file_options(parser)
    out = {}
    seen: dict[str, str] = {}
    for key, value in table.items():
        action = options.get(key)
        if action is None:
            raise ConfigError(f"{path}: [{command}] unknown key {key!r} (the keys are the "
                              f"long options of `cim-provider {command}` without dashes)")
        if action.dest in seen:
            raise ConfigError(f"{path}: [{command}] {key} and {seen[action.dest]} are the "
                              f"same option: give one")
        seen[action.dest] = key
        out[action.dest] = convert(f"{path}: [{command}] {key}", action, value)
    return out


def explicit_dests(parsers: list[argparse.ArgumentParser], parse: Callable[[], argparse.Namespace]
                   ) -> set[str]:
    """The dests the command line itself set: `parse()` again with every default of
    `parsers` suppressed, so only what was given lands in the namespace."""
    saved = []
    for p in parsers:
        for action in p._actions:
            saved.append((action, action.default))
            action.default = argparse.SUPPRESS
    try:
        return set(vars(parse()))
    finally:
        for action, default in saved:
            action.default = default


class CommandLine:
    """The command line and the configuration file of one `cim-provider` run.

    `parse()` gives the options: the command line's, else the file's, else the
    defaults. It can be called again (SIGHUP) to read the file anew; ConfigError if
    the file is unusable.
    """

    def __init__(self, parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser,
                 argv: list[str], command: str) -> None:
        self.parser = parser
        self.subparser = subparser
        self.argv = list(argv)
        self.command = command
        self.explicit = explicit_dests([parser, subparser], lambda: parser.parse_args(self.argv))
        self.path: Path | None = None

    def config_path(self, args: argparse.Namespace) -> Path | None:
        given = getattr(args, "config", None)
        if given is not None:
            return Path(given)
        env = os.environ.get("CIM_PROVIDER_CONFIG")
        if env is not None:          # "" disables the default file (tests, packagers)
            return Path(env) if env else None
        return DEFAULT_PATH if DEFAULT_PATH.exists() else None

    def parse(self) -> argparse.Namespace:
        args = self.parser.parse_args(self.argv)
        self.path = self.config_path(args)
        if self.path is not None:
            values = section_values(self.path, read(self.path), self.command, self.subparser)
            for dest, value in values.items():
                if dest not in self.explicit:
                    setattr(args, dest, value)
        args.config = self.path
        args.reread_config = self.parse
        return args


def changed_options(old: argparse.Namespace, new: argparse.Namespace) -> list[str]:
    """The dests whose values differ between two parses (internal attributes aside)."""
    keys = (set(vars(old)) | set(vars(new))) - INTERNAL
    return sorted(k for k in keys if getattr(old, k, None) != getattr(new, k, None))


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")
