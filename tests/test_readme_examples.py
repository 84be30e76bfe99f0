"""README.md's examples, run for real (issue 11).

`cim-provider demo` runs in a subprocess on free loopback ports, with its own private
bus and libvirt test driver (nothing shared with other tests). The ```sh blocks of the
README's "Examples" and "Lifecycle indications" sections are cut into commands
(continuation lines and multi-line functions joined, comments dropped) and run one
after the other in one bash, as a reader pasting them would, so variables carry over.
Only the ports, the listener's name and its file are substituted. Every command must
exit 0 -- or fail exactly as the README says it does -- and show what the README says
(checked against its output and, independently, with pywbem); the ```python blocks
are executed too. A command the README drops or rewrites leaves its expectation
unused, which fails the test as well.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pywbem

from cim_provider.demo import TEMPLATED

try:
    from tests.support.wbem_server import ROOT, env_without_proxy, free_port, wait_accepting
except ImportError:  # tests/ itself on sys.path
    from support.wbem_server import ROOT, env_without_proxy, free_port, wait_accepting  # type: ignore

pytestmark = [pytest.mark.skipif(shutil.which("wbemcli") is None,
                                 reason="sblim wbemcli is not installed"),
              pytest.mark.timeout(170)]

README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
DEMO_PORT, LISTENER_PORT = 5988, 5999            # as the README writes them
INDI_FILE = "/tmp/indications.log"
LISTENER = "console"
GNOME = "1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0001"
KDE = "1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0002"
TEST = "6695eb01-f6a4-8304-79aa-97f2502e193f"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


# ---------------------------------------------------------------- the README

def section(title: str) -> str:
    """The text of `## title` up to the next level-2 heading (its ### included)."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no section {title!r}"
    return m.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def complete(text: str) -> bool:
    """Whether `text` is a whole shell command (bash -n does not ask for more)."""
    r = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert "unexpected end of file" in r.stderr or r.returncode == 0, (text, r.stderr)
    return r.returncode == 0


def commands(block: str) -> list[str]:
    """A ```sh block as commands: comment-only and blank lines dropped, a command
    continued (a trailing backslash, an open pipe, a function body) joined."""
    out: list[str] = []
    pending: list[str] = []
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        text = "\n".join(pending)
        if line.endswith("\\") or not complete(text):
            continue
        out.append(text)
        pending = []
    assert not pending, f"an unfinished command in the README: {pending}"
    return out


# ---------------------------------------------------------------- the demo and the shell

class Demo:
    """`cim-provider demo` on free loopback ports (HTTP and HTTPS)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "demo.log"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "cim-provider"), "demo", "--listen", f"127.0.0.1:{self.port}",
                 "--https-listen", f"127.0.0.1:{free_port()}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir), env=env)
        deadline = time.monotonic() + 60
        wait_accepting(self.port, deadline, self.proc)
        while "cim-provider demo is serving" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def conn(self) -> pywbem.WBEMConnection:
        return pywbem.WBEMConnection(self.url, default_namespace="root/virt", timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)          # as Ctrl-C: it removes its bus, files
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Shell:
    """One bash; `run(cmd)` runs one command in it (its output to files) and returns
    (exit status, stdout, stderr). Assignments and functions stay for the next ones."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.dir = cwd / "shell"
        self.dir.mkdir()
        self.n = 0
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=(self.dir / "bash.err").open("w"),
                                     text=True, cwd=str(cwd), env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str, str]:
        self.n += 1
        out, err = self.dir / f"{self.n}.out", self.dir / f"{self.n}.err"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{{ {cmd}\n}} >{out} 2>{err} </dev/null; "
                              f"echo \"__done_{self.n}__ $?\"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no end within {timeout} s: {cmd}") from None
            if line.startswith(f"__done_{self.n}__ "):
                return int(line.split()[1]), out.read_text(), err.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------- what the README says

@dataclass
class Ctx:
    demo: Demo
    shell: Shell
    indi_file: Path
    values: dict[str, str] = field(default_factory=dict)

    def var(self, name: str) -> str:
        rc, out, _ = self.shell.run(f'printf "%s" "${name}"')
        assert rc == 0
        return out


@dataclass
class Expect:
    """What the README says of the first command matching `pattern` (the command as
    written in the README), not yet claimed by an earlier expectation."""
    pattern: str
    check: Callable[[Ctx, str, str], None] = lambda ctx, out, err: None
    rc: int = 0
    before: Callable[[Ctx], None] | None = None
    used: bool = False


def has(*needles: str) -> Callable[[Ctx, str, str], None]:
    """The output shows each needle ({listener}, {listener_port}: the substituted ones)."""
    def check(ctx: Ctx, out: str, err: str) -> None:
        for n in needles:
            n = n.format_map(ctx.values)
            assert n in out, f"{n!r} not in the output:\n{out}"
    return check


def refused(ctx: Ctx, out: str, err: str) -> None:
    # the Manager's reason: kde-dev does not fit
    assert "CIM_ERR_FAILED" in err and "kde-dev" in err and "memory" in err, err


def cs(ctx: Ctx, uuid: str) -> pywbem.CIMInstance:
    path = pywbem.CIMInstanceName("VIRT_ComputerSystem", {
        "CreationClassName": "VIRT_ComputerSystem", "Name": uuid}, namespace="root/virt")
    return ctx.demo.conn().GetInstance(path)


def gone(ctx: Ctx, uuid: str) -> None:
    with pytest.raises(pywbem.CIMError) as exc:
        cs(ctx, uuid)
    assert exc.value.status_code == pywbem.CIM_ERR_NOT_FOUND


def quantity(ctx: Ctx, uuid: str, part: str) -> int:
    path = pywbem.CIMInstanceName("VIRT_ResourceAllocationSettingData",
                                  {"InstanceID": f"VIRT:defined:{uuid}/{part}"},
                                  namespace="root/virt")
    return int(ctx.demo.conn().GetInstance(path)["VirtualQuantity"])


def vssd(ctx: Ctx, uuid: str) -> pywbem.CIMInstance:
    path = pywbem.CIMInstanceName("VIRT_VirtualSystemSettingData",
                                  {"InstanceID": f"VIRT:defined:{uuid}"}, namespace="root/virt")
    return ctx.demo.conn().GetInstance(path)


def demo_systems(ctx: Ctx, out: str, err: str) -> None:
    for name, state in (("gnome-test", 3), ("kde-dev", 3), ("test", 2), ("transient-demo", 2)):
        assert f'ElementName="{name}",EnabledState={state}' in out, out


# the demo's systems: four, and those it renders from its templates (demo.TEMPLATED)
SYSTEMS = 4 + len(TEMPLATED)


def enumerated(ctx: Ctx, out: str, err: str) -> None:
    assert out.count("instance of VIRT_ComputerSystem {") == SYSTEMS, out
    for name in ("gnome-test", "kde-dev", "test", "transient-demo"):
        assert f'ElementName = "{name}";' in out, out


def associators(ctx: Ctx, out: str, err: str) -> None:
    # every guest, the management service, the profile
    assert out.count("instance of VIRT_ComputerSystem {") == SYSTEMS, out
    assert "instance of VIRT_VirtualSystemManagementService {" in out, out
    assert "instance of VIRT_RegisteredProfile {" in out, out


def hosted(ctx: Ctx, out: str, err: str) -> None:
    names = re.findall(rf'VIRT_ComputerSystem\.CreationClassName="VIRT_ComputerSystem",'
                       rf'Name="({UUID_RE})"', out)
    assert len(names) == SYSTEMS and {GNOME, KDE, TEST} <= set(names), out


def profiles(ctx: Ctx, out: str, err: str) -> None:
    for name in ("System Virtualization", "Virtual System"):
        assert name in out, out


def defined_two(ctx: Ctx, out: str, err: str) -> None:
    web1, web2 = ctx.var("WEB1"), ctx.var("WEB2")
    assert re.fullmatch(UUID_RE, web1) and re.fullmatch(UUID_RE, web2), (web1, web2)
    ctx.values.update(web1=web1, web2=web2)
    assert quantity(ctx, web1, "mem") == 262144
    assert (quantity(ctx, web2, "proc"), quantity(ctx, web2, "mem")) == (2, 262144)


def both_passive(ctx: Ctx, out: str, err: str) -> None:
    for name in ("web-1", "web-2"):
        assert f'ElementName="{name}",EnabledState=3' in out, out


def renamed(ctx: Ctx, out: str, err: str) -> None:
    assert "ModifySystemSettings: 0" in out, out
    sys1 = cs(ctx, ctx.values["web1"])
    assert (sys1["ElementName"], sys1["EnabledDefault"]) == ("web-one", 2)
    assert vssd(ctx, ctx.values["web1"])["AutomaticStartupAction"] == 4


def autostart2(ctx: Ctx, out: str, err: str) -> None:
    assert "ReturnValue=0" in out, out
    assert vssd(ctx, ctx.values["web2"])["AutomaticStartupAction"] == 4
    assert cs(ctx, ctx.values["web2"])["EnabledDefault"] == 2


def resized2(ctx: Ctx, out: str, err: str) -> None:
    assert "ReturnValue=0" in out and "ResultingResourceSettings=" in out, out
    web2 = ctx.values["web2"]
    assert (quantity(ctx, web2, "proc"), quantity(ctx, web2, "mem")) == (4, 512 * 1024)


def resized1_by_wbemcli(ctx: Ctx, out: str, err: str) -> None:
    # the README: the change is made, then wbemcli fails on the answer (exit 16)
    assert "Parse Exception: Bad attribute list for VALUE" in err, err
    assert quantity(ctx, ctx.values["web1"], "proc") == 2


def destroyed1(ctx: Ctx, out: str, err: str) -> None:
    assert "DestroySystem: 0" in out, out
    gone(ctx, ctx.values["web1"])


def destroyed2(ctx: Ctx, out: str, err: str) -> None:
    assert "ReturnValue=0" in out, out
    gone(ctx, ctx.values["web2"])


def wait_for_indication(ctx: Ctx) -> None:
    deadline = time.monotonic() + 15
    while not (ctx.indi_file.exists() and "ModifiedIndication" in ctx.indi_file.read_text()):
        assert time.monotonic() < deadline, "no indication reached the listener's file"
        time.sleep(0.1)


def indication(ctx: Ctx, out: str, err: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, out
    for line in lines:
        assert "VIRT_ComputerSystemModifiedIndication" in line and TEST in line, out


EXPECTATIONS = [
    # Examples
    Expect(r"^wbemcli ei .*VIRT_ComputerSystem' ElementName,EnabledState( +#.*)?$", demo_systems),
    Expect(r"instance enumerate VIRT_ComputerSystem --pl ElementName,EnabledState", enumerated),
    Expect(r"instance associators VIRT_HostSystem\.\?", associators),
    Expect(r"^HOST=.*wbemcli ein .*VIRT_HostSystem"),
    Expect(r"^wbemcli ain -ac VIRT_HostedDependency \"\$HOST\"$", hosted),
    Expect(r'^wbemcli cm "\$GNOME" RequestStateChange\.RequestedState=2$',
           has("RequestStateChange: 0")),
    Expect(r'^wbemcli cm "\$GNOME" RequestStateChange\.RequestedState=9$',
           has("RequestStateChange: 0")),
    Expect(r'^wbemcli gi "\$GNOME" EnabledState$', has("EnabledState=9")),
    Expect(r'^wbemcli cm "\$GNOME" RequestStateChange\.RequestedState=2$',
           has("RequestStateChange: 0")),
    Expect(rf"{KDE}[\s\S]*RequestedState=2$", refused, rc=16),
    Expect(r"-d interop profile list$", profiles),
    # define, modify, destroy
    Expect(r"^VSMS=.*wbemcli ein .*VIRT_VirtualSystemManagementService"),
    Expect(r"^uuid_of\(\) \{"),
    Expect(r'^wbemcli cm "\$VSMS" \'DefineSystem\..*"web-1"',
           has("DefineSystem: 0, ResultingSystem (reference): root/virt:VIRT_ComputerSystem.")),
    Expect(r"DefineSystem \\\n.*\"web-2\"", has("ReturnValue=0", "ResultingSystem=")),
    Expect(r"^WEB1=\$\(uuid_of web-1\); WEB2=\$\(uuid_of web-2\)$", defined_two),
    Expect(r"^wbemcli ei .*VIRT_ComputerSystem' ElementName,EnabledState( +#.*)?$", both_passive),
    Expect(r'^wbemcli cm "\$VSMS" \'ModifySystemSettings\.', renamed),
    Expect(r"ModifySystemSettings \\\n.*WEB2", autostart2),
    Expect(r"ModifyResourceSettings \\\n.*WEB2", resized2),
    Expect(r'^wbemcli cm "\$VSMS" \'ModifyResourceSettings\..*WEB1', resized1_by_wbemcli,
           rc=16),
    Expect(r'^wbemcli gi .*VIRT:defined:\$WEB1/proc.*VirtualQuantity$',
           has("VirtualQuantity=2")),
    Expect(r'^wbemcli cm "\$VSMS" "DestroySystem\..*\$WEB1', destroyed1),
    Expect(r"DestroySystem \\\n.*\$WEB2", destroyed2),
    # Lifecycle indications
    Expect(r"^PATH=\"\$PWD/\.venv/bin:\$PATH\""),
    Expect(r"^pywbemlistener start console .*--port 5999",
           has("Started listener {listener} at http://127.0.0.1:{listener_port}")),
    Expect(r"subscription add-destination console", has("Added owned destination")),
    Expect(r"subscription add-filter states", has("Added owned filter")),
    Expect(r"subscription add-subscription console states", has("Added owned subscription")),
    Expect(rf"^TEST='.*{TEST}"),
    Expect(r'^wbemcli cm "\$TEST" RequestStateChange\.RequestedState=9$',
           has("RequestStateChange: 0")),
    Expect(r'^wbemcli cm "\$TEST" RequestStateChange\.RequestedState=2$',
           has("RequestStateChange: 0")),
    Expect(r"^cat /tmp/indications\.log", indication, before=wait_for_indication),
    Expect(r"subscription remove-server$",
           has("Remove counts: destinations=1, filters=1, subscriptions=1")),
    Expect(r"^pywbemlistener stop console$", has("Stopped listener")),
]


# ---------------------------------------------------------------- the test

@pytest.fixture
def setup(tmp_path):
    """The demo, and a bash in a folder of its own (`.venv` linked to the project's,
    a private HOME) so nothing the commands write lands in the checkout."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    home = tmp_path / "home"
    home.mkdir()
    listener = f"readme{uuidlib.uuid4().hex[:8]}"     # ours alone: stopped by this name
    demo = Demo(tmp_path)
    shell = None
    try:
        shell = Shell(tmp_path, env_without_proxy(home))
        yield demo, shell, listener, tmp_path
    finally:
        if shell is not None:
            shell.close()
        # the listener, should the test have ended before the README stops it
        subprocess.run([str(VENV_BIN / "pywbemlistener"), "stop", listener],
                       capture_output=True, timeout=30, env=env_without_proxy(home),
                       cwd=str(tmp_path))
        demo.stop()


def test_readme_examples(setup):
    demo, shell, listener, tmp_path = setup
    listener_port = free_port()
    indi_file = tmp_path / "indications.log"

    def substitute(cmd: str) -> str:
        cmd = cmd.replace(f":{DEMO_PORT}", f":{demo.port}")
        cmd = cmd.replace(f":{LISTENER_PORT}", f":{listener_port}")
        cmd = cmd.replace(f"--port {LISTENER_PORT}", f"--port {listener_port}")
        cmd = cmd.replace(INDI_FILE, str(indi_file))
        return re.sub(rf"\b{LISTENER}\b", listener, cmd)

    examples, lifecycle = section("Examples"), section("Lifecycle indications")
    sh = [c for text in (examples, lifecycle) for b in blocks(text, "sh") for c in commands(b)]
    assert len(sh) >= 30, sh
    for needle in (f"localhost:{DEMO_PORT}", f"127.0.0.1:{LISTENER_PORT}", INDI_FILE,
                   f"start {LISTENER} "):
        assert any(needle in c for c in sh), f"the README no longer has {needle!r}"
    assert "PORT=5988" not in examples

    ctx = Ctx(demo, shell, indi_file,
              {"listener": listener, "listener_port": str(listener_port)})
    expectations = [dataclasses.replace(e) for e in EXPECTATIONS]
    for cmd in sh:
        exp = next((e for e in expectations if not e.used and re.search(e.pattern, cmd, re.M)),
                   None)
        if exp is not None:
            exp.used = True
            if exp.before is not None:
                exp.before(ctx)
        rc, out, err = shell.run(substitute(cmd))
        want = exp.rc if exp is not None else 0
        assert rc == want, f"exit status {rc}, not {want}: {cmd}\n{out}\n{err}"
        if exp is not None:
            out = out.replace(f":{demo.port}", f":{DEMO_PORT}")
            try:
                exp.check(ctx, out, err)
            except AssertionError as exc:
                raise AssertionError(f"{cmd}\n{exc}") from None
    unused = [e.pattern for e in expectations if not e.used]
    assert not unused, f"README commands no longer there (or changed): {unused}"

    # the pywbem snippets, port substituted; the query lists the running systems (the
    # demo's two, and gnome-test, which the Examples started)
    snippets = blocks(examples, "python") + blocks(lifecycle, "python")
    assert any("ExecQuery" in code for code in snippets), "the README has no query example"
    for code in snippets:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code.replace(f":{DEMO_PORT}", f":{demo.port}"), "README.md", "exec"),
                 {"__name__": "readme"})
        if "ExecQuery" in code:
            names = buf.getvalue().split()
            assert sorted(names) == ["gnome-test", "test", "transient-demo"], buf.getvalue()
