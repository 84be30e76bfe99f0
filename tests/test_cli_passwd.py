"""`cim-provider passwd`: `--password-stdin` (one line), `--list` (names and roles, never
hashes), `--delete USER` (a user that is not there is an error), and a `--help` that
says how the password is entered. The installed command, run as a user would."""
from __future__ import annotations

import subprocess

import pytest

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

from cim_provider.server import auth

pytestmark = pytest.mark.timeout(120)


def passwd(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(ws.CIM_PROVIDER), "passwd", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def hashes(users) -> dict[str, tuple[str, str]]:
    out = {}
    for line in users.read_text().splitlines():
        name, role, encoded = line.split(":", 2)
        out[name] = (role, encoded)
    return out


def test_password_stdin_reads_one_line(tmp_path):
    users = tmp_path / "users"
    p = passwd("--users", str(users), "carol", "--role", "operator", "--password-stdin",
               stdin="one-line-pw\nignored second line\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"carol: added (role operator) in {users}"
    role, encoded = hashes(users)["carol"]
    assert role == "operator" and auth.verify_password("one-line-pw", encoded)
    assert "one-line-pw" not in users.read_text()
    # without a final newline too, and the role is kept on a change
    p = passwd("--users", str(users), "carol", "--password-stdin", stdin="other-pw-2")
    assert p.returncode == 0, p.stderr
    role, encoded = hashes(users)["carol"]
    assert role == "operator" and auth.verify_password("other-pw-2", encoded)


@pytest.mark.parametrize("stdin,message", [("", "standard input is empty"),
                                           ("short\n", "at least 8 characters")])
def test_password_stdin_refusals(tmp_path, stdin, message):
    p = passwd("--users", str(tmp_path / "users"), "carol", "--password-stdin", stdin=stdin)
    assert p.returncode == 1 and message in p.stderr
    assert not (tmp_path / "users").exists()


def test_without_password_stdin_two_lines_still_work(tmp_path):
    users = tmp_path / "users"
    assert passwd("--users", str(users), "dave", stdin="pass-word-1\npass-word-1\n") \
        .returncode == 0
    p = passwd("--users", str(users), "erin", stdin="pass-word-1\n")
    assert p.returncode == 1 and "differ" in p.stderr


def test_list_shows_names_and_roles_never_hashes(tmp_path):
    users = tmp_path / "users"
    for name, role in (("carol", "operator"), ("dave", "reader")):
        assert passwd("--users", str(users), name, "--role", role, "--password-stdin",
                      stdin="pass-word-1\n").returncode == 0
    p = passwd("--users", str(users), "--list")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["carol operator", "dave reader"]
    assert "scrypt" not in p.stdout + p.stderr
    for _role, encoded in hashes(users).values():
        assert encoded not in p.stdout
    # an empty file lists nothing; a missing one is an error
    assert passwd("--users", str(users), "--delete", "carol").returncode == 0
    assert passwd("--users", str(users), "--delete", "dave").returncode == 0
    p = passwd("--users", str(users), "--list")
    assert (p.returncode, p.stdout) == (0, "")
    p = passwd("--users", str(tmp_path / "nothing"), "--list")
    assert p.returncode == 1 and "does not exist" in p.stderr


def test_list_refuses_a_public_file(tmp_path):
    users = tmp_path / "users"
    assert passwd("--users", str(users), "carol", "--password-stdin",
                  stdin="pass-word-1\n").returncode == 0
    users.chmod(0o644)
    p = passwd("--users", str(users), "--list")
    assert p.returncode == 1 and "group or others" in p.stderr and p.stdout == ""


def test_delete_user(tmp_path):
    users = tmp_path / "users"
    for name in ("carol", "dave", "erin"):
        assert passwd("--users", str(users), name, "--password-stdin",
                      stdin="pass-word-1\n").returncode == 0
    p = passwd("--users", str(users), "--delete", "carol")
    assert p.returncode == 0 and p.stdout.strip() == f"carol: deleted in {users}"
    # the older form, USER --delete, too
    assert passwd("--users", str(users), "dave", "--delete").returncode == 0
    assert list(hashes(users)) == ["erin"]
    before = users.read_text()
    p = passwd("--users", str(users), "--delete", "carol")
    assert p.returncode == 1 and f"carol is not in {users}" in p.stderr
    assert users.read_text() == before
    p = passwd("--users", str(tmp_path / "nothing"), "--delete", "carol")
    assert p.returncode == 1 and "does not exist" in p.stderr
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("args,message", [
    (["--list", "carol"], "--list takes no user"),
    (["--list", "--role", "operator"], "--list takes no --role"),
    (["--delete", "carol", "--password-stdin"], "--delete takes no --role or --password-stdin"),
    (["--delete", "carol", "dave"], "which one?"),
    (["--delete"], "--delete needs a user"),
    ([], "give a USER to add or change, --delete USER or --list"),
])
def test_contradictions_are_usage_errors(tmp_path, args, message):
    p = passwd("--users", str(tmp_path / "users"), *args, stdin="pass-word-1\n")
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / "users").exists()


def test_help_says_how_the_password_is_entered():
    p = passwd("--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for words in ("asked twice on a terminal", "with --password-stdin it is read as one line "
                  "of standard input", "two lines", "--list", "--delete [USER]",
                  "never given as an argument"):
        assert words in text, words
