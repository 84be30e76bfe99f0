"""The man page docs/man/cim-provider.1 is generated from the argparse definitions
(cim_provider/manpage.py): every option of every subcommand is in it, and
regenerating it -- in any environment -- gives the file as committed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

from cim_provider import cli, manpage

pytestmark = pytest.mark.timeout(120)

PAGE = ws.ROOT / "docs" / "man" / "cim-provider.1"
REGENERATE = f"{sys.executable} -m cim_provider.manpage -o docs/man/cim-provider.1"


def test_page_is_what_the_definitions_generate():
    assert PAGE.read_text(encoding="utf-8") == manpage.generate(), \
        f"docs/man/cim-provider.1 is out of date: {REGENERATE}"


def test_every_option_of_every_subcommand_is_in_the_page():
    text = PAGE.read_text(encoding="utf-8")
    top, _ = cli.build_parser([])
    missing = [s for a in top._actions for s in a.option_strings
               if f"\\fB{manpage.roff(s)}\\fR" not in text]
    for name in cli.SUBCOMMANDS:
        assert f".SS {manpage.roff(name)}\n" in text
        _top, subs = cli.build_parser([name])
        for action in subs[name]._actions:
            for s in action.option_strings:
                if s in ("-h", "--help"):
                    continue
                if f"\\fB{manpage.roff(s)}\\fR" not in text:
                    missing.append(f"{name} {s}")
            if not action.option_strings:          # positional: USER
                assert manpage.invocation(action) in text      # \fI[USER]\fR
    assert missing == []


def test_regenerating_elsewhere_gives_the_same_text(tmp_path):
    """Another user, terminal width, state and cache directories: the same page."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "37",
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CACHE_HOME": str(tmp_path / "c"),
           "LIBVIRT_DEFAULT_URI": "test:///default", "LANG": "C"}
    out = tmp_path / "page.1"
    p = subprocess.run([sys.executable, "-m", "cim_provider.manpage", "-o", str(out)],
                       cwd=str(ws.ROOT), env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert out.read_text(encoding="utf-8") == PAGE.read_text(encoding="utf-8")
    check = subprocess.run([sys.executable, "-m", "cim_provider.manpage", "--check", str(PAGE)],
                           cwd=str(ws.ROOT), env=env, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr
    stale = tmp_path / "stale.1"
    stale.write_text("old\n")
    check = subprocess.run([sys.executable, "-m", "cim_provider.manpage", "--check", str(stale)],
                           cwd=str(ws.ROOT), env=env, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 1 and "out of date" in check.stderr


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff")
def test_page_renders_without_warnings():
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LANG": "C"})
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_roff_escapes():
    assert manpage.roff("--listen a\\b") == "\\-\\-listen a\\eb"
    assert manpage.roff(".starts a request\n'so does this") == \
        "\\&.starts a request\n\\&'so does this"
