"""Installed as a package, cim-provider works outside the checkout.

Quick checks here (packaging configuration, where the schema is looked for, the
message when it is missing, `setup-schema --from`); the `slow` test builds the wheel
from a copy of the checkout, installs it with its dependencies into a fresh venv
(no system site-packages, no index: the dependencies' wheels are built once with the
project venv's pip and kept in the pytest cache), and from another folder runs
`--version`, `serve` without a schema, `setup-schema --from ZIP`, and `serve` on
libvirt's test driver, read with sblim `wbemcli`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

try:
    from tests.support.wbem_server import free_port, wait_accepting
except ImportError:  # tests/ itself on sys.path
    from support.wbem_server import free_port, wait_accepting  # type: ignore

import cim_provider
from cim_provider import schema_setup
from cim_provider.wbem import repository, schema_files
from cim_provider.wbem.repository import (SCHEMA_ZIP_NAME, Repository, SchemaNotFound,
                                          resolve_cache_dir)

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_ZIP = ROOT / "build" / "schema" / SCHEMA_ZIP_NAME
CLI = ROOT / ".venv" / "bin" / "cim-provider"


def missing_message(where: Path) -> str:
    return (f"DMTF schema not found in {where}: run `cim-provider setup-schema` "
            f"(or `cim-provider setup-schema --from ZIP`)")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- packaging configuration --------------------------------------------------------

def test_every_package_is_listed_and_the_mof_is_mapped():
    st = _pyproject()["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "cim_provider").rglob("__init__.py")}
    assert set(st["packages"]) == on_disk | {"cim_provider.mof"}
    assert st["package-dir"] == {"cim_provider.mof": "mof"}
    assert {"*.mof", "*.xml", "*.md", "*.conf"} <= set(st["package-data"]["*"])


def test_the_version_is_written_once():
    pp = _pyproject()
    assert "version" not in pp["project"] and "version" in pp["project"]["dynamic"]
    assert pp["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cim_provider.__version__"}
    out = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"cim-provider {cim_provider.__version__}"
    out = subprocess.run([str(CLI), "serve", "--version"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"cim-provider {cim_provider.__version__}"


def test_the_fetch_script_takes_the_same_sdist():
    script = (ROOT / "scripts" / "fetch_schema.sh").read_text()
    assert re.search(r"^ver=(\S+)$", script, re.M).group(1) == schema_setup.PYWBEM_SDIST_VERSION
    assert SCHEMA_ZIP_NAME in script


def test_bench_is_not_a_subcommand():
    from cim_provider.cli import SUBCOMMANDS
    assert "bench" not in SUBCOMMANDS and "setup-schema" in SUBCOMMANDS
    assert all(mod.startswith("cim_provider.") for mod, _ in SUBCOMMANDS.values())


# --- where the schema is looked for -------------------------------------------------

def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(repository.CACHE_DIR_ENV, raising=False)
    assert repository.running_from_checkout()
    assert resolve_cache_dir() == ROOT / "build"                  # the checkout's build/
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"    # --cache-dir first
    monkeypatch.setenv(repository.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(repository.CACHE_DIR_ENV)
    monkeypatch.setattr(schema_files, "running_from_checkout", lambda: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert resolve_cache_dir() == Path("/var/cache/cim-provider")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "cim-provider"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "cim-provider"


def test_a_missing_schema_says_how_to_fetch_it(tmp_path):
    with pytest.raises(SchemaNotFound) as err:
        Repository.load(tmp_path / "empty")
    assert str(err.value) == missing_message(tmp_path / "empty")
    for cmd in ("serve", "demo"):
        out = subprocess.run([str(CLI), cmd, "--cache-dir", str(tmp_path / "empty"),
                              "--listen", "127.0.0.1:59881"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2, out
        assert out.stderr.strip() == missing_message(tmp_path / "empty"), out
    env = {**os.environ, repository.CACHE_DIR_ENV: str(tmp_path / "env")}
    out = subprocess.run([str(CLI), "serve"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env)
    assert (out.returncode, out.stderr.strip()) == (2, missing_message(tmp_path / "env"))
    assert not (tmp_path / "empty").exists() and not (tmp_path / "env").exists()
    junk = tmp_path / "junk" / "schema" / SCHEMA_ZIP_NAME        # unreadable: also exit 2
    junk.parent.mkdir(parents=True)
    junk.write_text("not a zip")
    out = subprocess.run([str(CLI), "serve", "--cache-dir", str(tmp_path / "junk")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "unreadable" in out.stderr and "Traceback" not in out.stderr


def test_setup_schema_from_a_local_zip(tmp_path, capsys):
    if not CHECKOUT_ZIP.is_file():
        pytest.fail(f"{CHECKOUT_ZIP} is missing: run `make setup`")
    cache = tmp_path / "cache"
    schema_setup.setup_schema(cache, CHECKOUT_ZIP)
    assert (cache / "schema" / SCHEMA_ZIP_NAME).read_bytes() == CHECKOUT_ZIP.read_bytes()
    pickles = list((cache / "classes").glob("classes-*.pickle"))
    assert len(pickles) == 1 and pickles[0].stat().st_mode & 0o777 == 0o644
    repo = Repository.load(cache)
    assert repo.namespace("root/virt").get("VIRT_ComputerSystem") is not None
    assert "compiled" in capsys.readouterr().out
    # again without --from: the zip is kept, nothing fetched
    schema_setup.setup_schema(cache)
    assert "already in" in capsys.readouterr().out
    # a file that is not the schema is refused before anything is replaced
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("hello.txt", "not a schema")
    with pytest.raises(schema_setup.SetupError, match="not the DMTF CIM Schema"):
        schema_setup.setup_schema(cache, bad)
    assert (cache / "schema" / SCHEMA_ZIP_NAME).read_bytes() == CHECKOUT_ZIP.read_bytes()
    out = subprocess.run([str(CLI), "setup-schema", "--cache-dir", str(cache), "--from", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not the DMTF CIM Schema" in out.stderr
    assert "Traceback" not in out.stderr


# --- the wheel, installed in a fresh venv -------------------------------------------

COPY_IGNORE = shutil.ignore_patterns(".venv", "build", ".git", "__pycache__", "*.egg-info",
                                     ".pytest_cache", ".mypy_cache", ".ruff_cache", "dist",
                                     "results.json", "*.png")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def _wheel_cache(request) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("install-wheels"))
    path = Path("/tmp/cim-provider-test-wheels")
    path.mkdir(exist_ok=True)
    return path


def _clean_env(venv_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", repository.CACHE_DIR_ENV,
                        "LIBVIRT_DEFAULT_URI", "PYTHONSTARTUP")}
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != (ROOT / ".venv" / "bin").resolve()]
    env["PATH"] = os.pathsep.join([str(venv_dir / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv_dir)
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)        # a cold wheel cache builds libvirt-python once
def test_installed_wheel_works_outside_the_checkout(tmp_path, request):
    if not CHECKOUT_ZIP.is_file():
        pytest.fail(f"{CHECKOUT_ZIP} is missing: run `make setup`")
    if shutil.which("wbemcli") is None:
        pytest.fail("sblim wbemcli is not installed (run `make setup`)")
    pip = ROOT / ".venv" / "bin" / "pip"

    # the wheel, from a copy of the checkout (no build/ or egg-info left in the tree)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    dist = tmp_path / "dist"
    _run([pip, "wheel", "--no-deps", "--quiet", "-w", dist, src])
    [wheel] = dist.glob("cim_provider-*.whl")
    assert wheel.name.startswith(f"cim_provider-{cim_provider.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for shipped in ("cim_provider/mof/virt.mof", "cim_provider/mof/interop.mof",
                    "cim_provider/contract/org.example.virt.Manager.xml",
                    "cim_provider/contract/MANAGER.md", "cim_provider/manager/org.example.virt.conf",
                    "cim_provider/schema_setup.py"):
        assert shipped in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cim_provider").rglob("*.py")}
    assert modules <= names
    assert not any(n.startswith(("bench/", "tests/", "build/")) or n.endswith(".zip")
                   for n in names)

    # its dependencies as wheels, built once and kept between runs
    wheels = _wheel_cache(request)
    venv_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(venv_dir)
    vpip = [venv_dir / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    install = vpip + ["install", "--quiet", "--no-index", "--find-links", wheels, wheel]
    env = _clean_env(venv_dir)
    if subprocess.run([str(c) for c in install], capture_output=True, env=env,
                      timeout=300).returncode != 0:
        _run([pip, "wheel", "--quiet", "-w", wheels, wheel], timeout=500)
        for stale in wheels.glob("cim_provider-*.whl"):
            stale.unlink()
        _run(install, env=env)

    # from another folder, the checkout nowhere on sys.path
    work = tmp_path / "elsewhere"
    work.mkdir()
    exe = venv_dir / "bin" / "cim-provider"
    where = _run([venv_dir / "bin" / "python", "-c",
                  "import cim_provider, sys; print(cim_provider.__file__); print(sys.path)"],
                 cwd=work, env=env).stdout
    assert str(venv_dir) in where.splitlines()[0] and str(ROOT) not in where

    out = _run([exe, "--version"], cwd=work, env=env)
    assert out.stdout.strip() == f"cim-provider {cim_provider.__version__}"
    out = _run([exe, "serve", "--version"], cwd=work, env=env)
    assert out.stdout.strip() == f"cim-provider {cim_provider.__version__}"
    out = subprocess.run([exe, "bench"], capture_output=True, text=True, cwd=work, env=env)
    assert out.returncode == 2 and "invalid choice" in out.stderr

    # no schema: the message, exit 2, nothing started
    cache = tmp_path / "cache"
    for extra, where_dir in (([], tmp_path / "env-cache"), (["--cache-dir", cache], cache)):
        run_env = {**env, repository.CACHE_DIR_ENV: str(where_dir)} if not extra else env
        out = subprocess.run([str(c) for c in [exe, "serve", "--listen", "127.0.0.1:59881", *extra]],
                             capture_output=True, text=True, cwd=work, env=run_env, timeout=60)
        assert (out.returncode, out.stderr.strip()) == (2, missing_message(where_dir)), out
    if os.geteuid() != 0:               # the default cache directory for a user
        xdg = {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        out = subprocess.run([str(exe), "serve"], capture_output=True, text=True, cwd=work,
                             env=xdg, timeout=60)
        assert (out.returncode, out.stderr.strip()) == \
            (2, missing_message(tmp_path / "xdg" / "cim-provider"))

    out = _run([exe, "setup-schema", "--from", CHECKOUT_ZIP, "--cache-dir", cache],
               cwd=work, env=env)
    assert "compiled" in out.stdout
    assert list((cache / "classes").glob("classes-*.pickle"))

    # serve libvirt's test driver; no Manager on a bus that does not exist
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "serve", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache),
             "--state-dir", str(tmp_path / "state"),
             "--manager-bus", f"unix:path={tmp_path}/no-such-bus"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
            env={**env, "LIBVIRT_DEFAULT_URI": "test:///default"})
    try:
        wait_accepting(port, time.monotonic() + 30, proc)
        url = f"http://127.0.0.1:{port}/root/virt:VIRT_ComputerSystem"
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run(["wbemcli", "ei", url, "ElementName,EnabledState"],
                                 capture_output=True, text=True, cwd=work, timeout=30)
            if 'ElementName="test"' in out.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.returncode == 0, out
        assert 'ElementName="test"' in out.stdout, out
        assert "EnabledState=2" in out.stdout, out
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    text = log_path.read_text(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
