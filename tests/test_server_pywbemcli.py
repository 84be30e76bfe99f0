"""pywbemcli with its default settings (pull operations first, falling back only on
CIM_ERR_NOT_SUPPORTED / CIM_ERR_FAILED) against the real server.

HOME and the working directory are a temporary directory, so no connections file or
log is read or written in the repository. `--log api=file` records the operations
pywbemcli really sent, so the tests can see that pull operations were used.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

try:
    from tests.support import wbem_server as ws
except ImportError:
    from support import wbem_server as ws

PYWBEMCLI = ws.ROOT / ".venv" / "bin" / "pywbemcli"

pytestmark = [pytest.mark.skipif(not PYWBEMCLI.exists(), reason="pywbemcli not installed"),
              pytest.mark.timeout(120)]


@pytest.fixture
def run(tmp_path):
    env = ws.env_without_proxy(tmp_path)
    for k in list(env):
        if k.startswith("PYWBEMCLI_") and k != "PYWBEMCLI_TERMWIDTH":
            del env[k]

    def run(url: str, *args: str, namespace: str = "interop", log: bool = False,
            expect_rc: int = 0, general: tuple[str, ...] = ()) -> str:
        logfile = tmp_path / "pywbemcli.log"
        if logfile.exists():
            logfile.unlink()
        cmd = [str(PYWBEMCLI), "-s", url, "-d", namespace, *general]
        if log:
            cmd += ["--log", "api=file"]
        r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=90,
                           env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
        assert r.returncode == expect_rc, (args, r.returncode, r.stdout, r.stderr)
        if log:
            run.operations = re.findall(r"Request:\S+ (\w+)\(", logfile.read_text())
        return r.stdout

    run.operations = []
    yield run
    assert not list(Path(ws.ROOT).glob("pywbemcli*.log"))
    assert not (Path(ws.ROOT) / "pywbemcli_connection_definitions.yaml").exists()


def test_class_enumerate(run, subprocess_server):
    out = run(subprocess_server.url, "class", "enumerate", "--names-only", "--deep-inheritance")
    names = set(out.split())
    assert {"CIM_Namespace", "CIM_ObjectManager", "CIM_ManagedElement",
            "VIRT_RegisteredProfile"} <= names
    out = run(subprocess_server.url, "class", "enumerate")
    assert "class CIM_ManagedElement {" in out
    assert "class CIM_Namespace" not in out           # not deep by default


def test_class_get(run, subprocess_server):
    out = run(subprocess_server.url, "class", "get", "CIM_Namespace")
    assert "class CIM_Namespace : CIM_ManagedElement {" in out
    assert re.search(r"\[Key \( true \),[^\]]*\]\s+string Name;", out)
    assert "string ElementName;" in out                # pywbemcli asks LocalOnly=false
    out = run(subprocess_server.url, "class", "get", "CIM_NoSuchClass", expect_rc=1)


def test_instance_enumerate_uses_pull(run, subprocess_server):
    out = run(subprocess_server.url, "instance", "enumerate", "CIM_Namespace",
              general=("--pull-max-cnt", "1"), log=True)
    assert out.count("instance of CIM_Namespace {") == 2
    assert 'Name = "interop";' in out and 'Name = "root/virt";' in out
    assert run.operations[0] == "OpenEnumerateInstances"
    assert "PullInstancesWithPath" in run.operations
    assert "EnumerateInstances" not in run.operations      # no fall-back


def test_instance_enumerate_names(run, subprocess_server):
    out = run(subprocess_server.url, "instance", "enumerate", "CIM_Namespace", "--names-only",
              log=True)
    paths = [line for line in out.splitlines() if line.strip()]
    assert len(paths) == 2
    assert all(re.match(r"//[^/]+/interop:CIM_Namespace\.", p) for p in paths)
    assert run.operations == ["OpenEnumerateInstancePaths"]


def test_instance_get(run, subprocess_server):
    out = run(subprocess_server.url, "instance", "enumerate", "CIM_ObjectManager", "--no")
    [path] = [line for line in out.splitlines() if line.strip()]
    out = run(subprocess_server.url, "instance", "get", path)
    assert "instance of CIM_ObjectManager {" in out
    assert 'ElementName = "cim-provider";' in out
    assert "OperationalStatus = { 2 };" in out
    bad = path.replace('Name="cim-provider"', 'Name="other"')
    out = run(subprocess_server.url, "instance", "get", bad, expect_rc=1)


def test_namespace_list(run, subprocess_server):
    out = run(subprocess_server.url, "namespace", "list")
    lines = [line.strip() for line in out.splitlines()]
    assert "interop" in lines and "root/virt" in lines


def test_namespace_interop(run, subprocess_server):
    assert run(subprocess_server.url, "namespace", "interop").strip() == "interop"


def test_server_brand(run, subprocess_server):
    assert run(subprocess_server.url, "server", "brand").strip() == "cim-provider"


def test_server_info(run, subprocess_server):
    from cim_provider import __version__
    out = run(subprocess_server.url, "server", "info")
    row = [line for line in out.splitlines() if line.startswith("cim-provider")]
    assert len(row) == 1
    assert __version__ in row[0] and "interop" in row[0] and "root/virt" in row[0]


def test_root_virt_pull_with_several_pulls(run, inproc_server):
    out = run(inproc_server.url, "instance", "enumerate", "CIM_ComputerSystem",
              general=("--pull-max-cnt", "1"), namespace="root/virt", log=True)
    assert out.count("instance of VIRT_ComputerSystem {") == 3
    assert out.count("instance of VIRT_HostSystem {") == 1
    assert run.operations.count("PullInstancesWithPath") == 3
    assert "EnumerateInstances" not in run.operations


def test_root_virt_associators(run, inproc_server):
    host = (f'VIRT_HostSystem.CreationClassName="VIRT_HostSystem",Name="{ws.TEST_HOST}"')
    out = run(inproc_server.url, "instance", "associators", host, "--names-only",
              namespace="root/virt", log=True)
    paths = [line for line in out.splitlines() if line.strip()]
    assert len(paths) == 3 and all(":VIRT_ComputerSystem." in p for p in paths)
    assert run.operations[0] == "OpenAssociatorInstancePaths"
    out = run(inproc_server.url, "instance", "references", host, "--result-class",
              "CIM_HostedDependency", namespace="root/virt")
    assert out.count("instance of VIRT_HostedDependency {") == 3


def test_root_virt_invoke_method(run, inproc_server):
    guest = (f'VIRT_ComputerSystem.CreationClassName="VIRT_ComputerSystem",'
             f'Name="{ws.GUEST_UUIDS[1]}"')
    out = run(inproc_server.url, "instance", "invokemethod", guest, "RequestStateChange",
              "-p", "RequestedState=2", namespace="root/virt")
    assert "ReturnValue=0" in out
    assert "CIM_ConcreteJob" in out
    _t, method, params = inproc_server.providers["guests"].calls[-1]
    assert method == "RequestStateChange" and params["RequestedState"] == 2
