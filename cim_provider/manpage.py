"""The man page cim-provider(1), written in roff from the argparse definitions, so it
cannot drift from `--help`: every subcommand, every option with its metavar, default
and help text, grouped as in `--help`.

    python -m cim_provider.manpage -o docs/man/cim-provider.1     # regenerate
    python -m cim_provider.manpage --check docs/man/cim-provider.1

The page is kept in the repository (docs/man/cim-provider.1); tests/test_cli_manpage.py
fails when it is not what this module generates. The output depends on nothing but the
definitions: no date, no terminal width, no user's home or uid (option help texts say
"$XDG_STATE_HOME" rather than expanding it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli

NAME = "cim-provider"
SUMMARY = "WBEM server for virtual machines (DMTF System Virtualization profiles)"

DESCRIPTION = """\
cim-provider lets WBEM clients (wbemcli, pywbem, pywbemcli, management consoles) see
and control every virtual machine of a host through the DMTF System Virtualization and
Virtual System profiles. Running domains come from libvirt; passive (inactive) ones from
a D-Bus service, org.example.virt.Manager; both are merged by UUID. The server speaks
CIM-XML over HTTP and HTTPS itself; no CIMOM is needed."""

# Sections after COMMANDS: (title, paragraphs); plain text, escaped like the rest.
TRAILER = [
    ("EXIT STATUS", [
        "0 when the command did what was asked (a server: when stopped by SIGINT or "
        "SIGTERM); 1 when it failed while running; 2 for a command line, configuration "
        "or start-up it refuses (an address in use, a TLS file it cannot use, a directory "
        "it cannot write, a listener the exposure rules forbid, a missing schema); the "
        "message says which and why, without a traceback.",
    ]),
    ("SIGNALS", [
        "serve: SIGHUP reloads what can change without a restart and reopens the audit "
        "log (--audit-log), for logrotate; SIGUSR1 logs the server's counts (connections, "
        "pull contexts, failed logins); SIGINT and SIGTERM stop it.",
    ]),
    ("AUDIT", [
        "serve logs every modifying operation (InvokeMethod, CreateInstance, "
        "ModifyInstance, DeleteInstance), done or refused, as one line on the logger "
        "cim_provider.audit: time, user (or local), client address, operation, target "
        "path, a summary of the parameters and the result (the return value, the created "
        "path, or the CIM error code and name). Passwords and other secrets never appear: "
        "a parameter or property named like password, secret or credential is shown as "
        "***, embedded instances only by class and key properties, long values are cut. "
        "With --audit-log FILE the same records are appended to FILE as JSON lines.",
    ]),
    ("ENVIRONMENT", [
        "LIBVIRT_DEFAULT_URI, DBUS_SYSTEM_BUS_ADDRESS, DBUS_SESSION_BUS_ADDRESS, "
        "CIM_PROVIDER_CACHE_DIR, XDG_CACHE_HOME, XDG_STATE_HOME: as the options above "
        "say. SSL_CERT_FILE and SSL_CERT_DIR: the trust store for HTTPS indication "
        "listeners.",
    ]),
    ("FILES", [
        "/var/lib/cim-provider (as root; else $XDG_STATE_HOME/cim-provider): "
        "subscriptions, the self-signed TLS pair, the reference Manager's SQLite store.",
        "/var/cache/cim-provider (as root; else $XDG_CACHE_HOME/cim-provider): the DMTF "
        "schema and the compiled classes.",
    ]),
    ("SEE ALSO", ["wbemcli(1), pywbemcli(1), logrotate(8)"]),
]


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _metavar(action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return None
    if action.metavar is not None:
        mv = str(action.metavar)
    elif action.choices is not None:
        mv = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        mv = action.dest.upper()
    return f"[{mv}]" if action.nargs == "?" else mv


def invocation(action: argparse.Action) -> str:
    """`--listen HOST:PORT`, `--manager-bus X, --bus X` or `USER`, as roff."""
    mv = _metavar(action)
    if not action.option_strings:
        return f"\\fI{roff(mv or action.dest)}\\fR"
    parts = []
    for opt in action.option_strings:
        part = f"\\fB{roff(opt)}\\fR"
        if mv:
            part += f" \\fI{roff(mv)}\\fR"
        parts.append(part)
    return ", ".join(parts)


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help as --help shows it (%(default)s expanded), unwrapped."""
    if not action.help:
        return ""
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split())   # argparse's own expansion


def _shown(action: argparse.Action, with_help: bool = False) -> bool:
    """Described in the page: not suppressed, not the subcommand list, and --help only
    once (with the global options)."""
    return action.help != argparse.SUPPRESS \
        and (with_help or not isinstance(action, argparse._HelpAction)) \
        and not isinstance(action, argparse._SubParsersAction)


def options(parser: argparse.ArgumentParser, skip: frozenset[str] | set[str] = frozenset(),
            titled: bool = True, with_help: bool = False) -> list[str]:
    """.TP entries per argument group (as --help groups them); `skip`: option strings
    already described (the global options)."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if _shown(a, with_help) and not set(a.option_strings) & skip]
        if not actions:
            continue
        title = group.title or "options"
        if title in ("options", "optional arguments"):
            title = "options" if any(a.option_strings for a in actions) else "arguments"
        if titled:
            out.append(f".PP\n\\fI{roff(title)}\\fR")
        for a in actions:
            out.append(f".TP\n{invocation(a)}\n{roff(help_text(parser, a))}")
    return out


def synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    words = [f"\\fB{NAME} {name}\\fR"]
    for a in parser._actions:
        if a.option_strings and a.required:
            words.append(invocation(a))
    words.append("[\\fIOPTIONS\\fR]")
    for a in parser._actions:
        if not a.option_strings and _shown(a):
            words.append(invocation(a))        # [USER] when optional
    return ".PP\n" + " ".join(words)


def generate() -> str:
    """The whole page."""
    top, _ = cli.build_parser([])
    globals_ = {s for a in top._actions for s in a.option_strings}
    out = [f'.TH {NAME.upper()} 1 "" "{NAME}" "User Commands"',
           ".\\\" Generated by python -m cim_provider.manpage from the argparse "
           "definitions: do not edit.",
           ".nh", ".ad l", ".SH NAME", f"{roff(NAME)} \\- {roff(SUMMARY)}",
           ".SH SYNOPSIS",
           f"\\fB{NAME}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]"]
    out += [".br\n" + f"\\fB{NAME} {roff(name)}\\fR ..." for name in cli.SUBCOMMANDS]
    out += [".SH DESCRIPTION", roff(DESCRIPTION),
            ".SH GLOBAL OPTIONS",
            "Given before the command or after it (the later one wins)."]
    out += options(top, titled=False, with_help=True)
    out.append(".SH COMMANDS")
    for name, (_module, summary) in cli.SUBCOMMANDS.items():
        _top, subs = cli.build_parser([name])
        parser = subs[name]
        out.append(f".SS {roff(name)}")
        out.append(synopsis(name, parser))
        out.append(".PP\n" + roff(summary[:1].upper() + summary[1:] + "."))
        if parser.description:
            out += [".PP\n" + roff(" ".join(par.split()))
                    for par in parser.description.split("\n\n")]
        out += options(parser, skip=globals_ - {"-h", "--help"})
    for title, paragraphs in TRAILER:
        out.append(f".SH {title}")
        out += [".PP\n" + roff(p) for p in paragraphs]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cim_provider.manpage",
                                description="Write the cim-provider(1) man page.")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                   help="write the page here (default: standard output)")
    p.add_argument("--check", type=Path, default=None, metavar="FILE",
                   help="exit 1 if FILE is not what would be generated (default: no check)")
    args = p.parse_args(argv)
    text = generate()
    if args.check is not None:
        current = args.check.read_text(encoding="utf-8") if args.check.exists() else ""
        if current != text:
            print(f"{args.check} is out of date: python -m cim_provider.manpage -o "
                  f"{args.check}", file=sys.stderr)
            return 1
        return 0
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
