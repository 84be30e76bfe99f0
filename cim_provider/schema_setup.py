"""`cim-provider setup-schema`: put the DMTF schema in the cache directory and compile.

The DMTF CIM Schema 2.49 MOF zip is not ours to ship. It is taken out of pywbem's
source distribution on the package index (`pip download`, as scripts/fetch_schema.sh
does for a machine without cim-provider), or from a local zip with `--from ZIP` on a
host without the index. Then the classes the project needs are compiled into the
class cache, so `serve` starts in well under a second. The cache directory is chosen
as wbem/repository.py's `resolve_cache_dir` says (`--cache-dir` first).

Also here: the `--cache-dir` option and the schema check shared by every command that
needs the repository (`serve`, `demo`). wbem/repository.py (and pywbem with it) is
imported only by the functions that use it: `serve` builds its parser from this module
and starts libvirt's open before the rest of the server is imported (server/main.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .wbem.repository import Repository

# The pywbem source distribution that carries the zip (tests/schema/).
PYWBEM_SDIST_VERSION = "1.9.1"

CACHE_DIR_HELP = ("where the DMTF schema and the compiled classes are kept; must be "
                  "writable when the classes are compiled (default: "
                  "$CIM_PROVIDER_CACHE_DIR, else build/ in a checkout, else "
                  "/var/cache/cim-provider as root, else $XDG_CACHE_HOME/cim-provider)")


class SetupError(Exception):
    """A fetch or a zip that went wrong; str() is the message for the user."""


def add_cache_dir_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help=CACHE_DIR_HELP)


def load_repository(cache_dir: Path | None) -> Repository | None:
    """The repository, or None after telling the user how to fetch a missing schema
    (or what is wrong with an unreadable one, or a class cache that must be written
    to a directory that is not writable)."""
    import zipfile
    from .wbem.repository import Repository, SchemaNotFound, resolve_cache_dir
    unwritable = _unwritable_class_cache(cache_dir)
    if unwritable is not None:
        print(unwritable, file=sys.stderr, flush=True)
        return None
    try:
        return Repository.load(cache_dir)
    except SchemaNotFound as exc:
        print(exc, file=sys.stderr, flush=True)
    except (OSError, zipfile.BadZipFile) as exc:
        print(f"DMTF schema in {resolve_cache_dir(cache_dir)} unreadable ({exc}): run "
              f"`cim-provider setup-schema` (or `cim-provider setup-schema --from ZIP`)",
              file=sys.stderr, flush=True)
    return None


def schema_missing(cache_dir: Path | None) -> bool:
    """True after telling the user what to run, when the schema is missing: checked
    before anything else starts, so that this is all `serve` says, and without pywbem
    (~0.15 s of imports), so that libvirt's open starts soon after (issue 16). The
    repository is loaded later, beside that open; load_repository says whether its
    classes can be compiled (exit 2 then too, the early connection closed unused)."""
    from .wbem.schema_files import SchemaNotFound, resolve_cache_dir, schema_zip_in
    where = resolve_cache_dir(cache_dir)
    if not schema_zip_in(where).is_file():
        print(SchemaNotFound(where), file=sys.stderr, flush=True)
        return True
    return False


def _unwritable_class_cache(cache_dir: Path | None) -> str | None:
    """Why the classes cannot be compiled into the cache directory, when they must be
    (no class cache for the current schema and MOF yet); None when they need not be or
    can be. Reading an existing cache from a read-only directory is fine."""
    from .wbem.repository import (DEFAULT_MOF_DIR, _cache_key, class_cache_in,
                                  resolve_cache_dir, schema_zip_in)
    where = resolve_cache_dir(cache_dir)
    zip_path = schema_zip_in(where)
    if not zip_path.is_file():
        return None                      # Repository.load says how to fetch it
    classes = class_cache_in(where)
    try:
        if (classes / f"classes-{_cache_key(zip_path, DEFAULT_MOF_DIR)}.pickle").is_file():
            return None
        classes.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=classes, prefix=".write-test-"):
            pass
    except OSError as exc:
        return (f"--cache-dir {where}: the compiled classes must be written to {classes}, "
                f"which is not writable ({exc.strerror}): give a writable --cache-dir, or "
                f"run `cim-provider setup-schema` as a user who can write it")
    return None


def check_schema_zip(path: Path) -> None:
    """SetupError unless `path` is a zip of the DMTF schema (qualifiers and classes)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise SetupError(f"{path} is not a readable zip: {exc}") from None
    missing = [n for n in ("qualifiers.mof", "qualifiers_optional.mof", "cim_schema_2.49.0.mof")
               if n not in names]
    if missing:
        raise SetupError(f"{path} is not the DMTF CIM Schema 2.49 MOF zip "
                         f"(no {', '.join(missing)})")


def _is_schema_zip(path: Path) -> bool:
    try:
        check_schema_zip(path)
    except SetupError as exc:
        print(f"{exc}: fetching it again", file=sys.stderr, flush=True)
        return False
    return True


def fetch_schema_zip(dest: Path, python: str = sys.executable) -> None:
    """Download pywbem's sdist with pip and take the schema zip out of it into `dest`."""
    import tarfile
    from .wbem.repository import SCHEMA_ZIP_NAME
    member_name = f"pywbem-{PYWBEM_SDIST_VERSION}/tests/schema/{SCHEMA_ZIP_NAME}"
    with tempfile.TemporaryDirectory(prefix="cim-provider-schema-") as tmp:
        cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", f"pywbem=={PYWBEM_SDIST_VERSION}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"cannot run pip to fetch the schema: {exc}") from None
        sdists = sorted(Path(tmp).glob("pywbem-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            detail = "\n".join(line for line in (proc.stderr or proc.stdout).splitlines()
                               if not line.startswith("WARNING: Location"))
            raise SetupError(f"could not download pywbem {PYWBEM_SDIST_VERSION}'s source "
                             f"distribution (it carries the schema){': ' if detail else ''}"
                             f"{detail.strip()}")
        try:
            with tarfile.open(sdists[0]) as tar:
                member = tar.extractfile(member_name)
                if member is None:
                    raise KeyError(member_name)
                part = Path(tmp) / SCHEMA_ZIP_NAME
                with member, part.open("wb") as out:
                    shutil.copyfileobj(member, out)
        except (KeyError, OSError, tarfile.TarError) as exc:
            raise SetupError(f"{sdists[0].name} has no {member_name}: {exc}") from None
        install_zip(part, dest)


def install_zip(src: Path, dest: Path) -> None:
    """Check `src` and copy it to `dest` atomically (nothing half there)."""
    check_schema_zip(src)
    if src.resolve() == dest.resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def setup_schema(cache_dir: Path | None = None, source: Path | None = None) -> Repository:
    """Fill the cache directory (the zip: from `source`, else kept, else fetched) and
    compile the class cache. SetupError when that fails."""
    from .wbem.repository import Repository, class_cache_in, resolve_cache_dir, schema_zip_in
    where = resolve_cache_dir(cache_dir)
    dest = schema_zip_in(where)
    try:
        if source is not None:
            if not source.is_file():
                raise SetupError(f"{source}: no such file")
            install_zip(source, dest)
            print(f"copied {source} to {dest}", flush=True)
        elif dest.is_file() and _is_schema_zip(dest):
            print(f"schema already in {dest}", flush=True)
        else:                   # missing, or unreadable: fetched again
            fetch_schema_zip(dest)
            print(f"fetched {dest}", flush=True)
        repo = Repository.load(where)
    except OSError as exc:
        raise SetupError(f"cannot set up {where}: {exc}") from None
    counts = ", ".join(f"{len(repo.namespace(n).classes)} classes in {n}"
                       for n in repo.namespace_names)
    print(f"compiled {counts} into {class_cache_in(where)}", flush=True)
    return repo


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import __version__
    from .wbem.repository import SCHEMA_ZIP_NAME
    p.add_argument("--version", action="version", version=f"cim-provider {__version__}")
    add_cache_dir_argument(p)
    p.add_argument("--from", dest="source", type=Path, default=None, metavar="ZIP",
                   help=f"take the schema from this local zip ({SCHEMA_ZIP_NAME}, e.g. "
                        "fetched elsewhere with scripts/fetch_schema.sh) instead of "
                        "downloading pywbem's source distribution from the package index "
                        "(default: download it, unless the cache directory has it)")


def run(args: argparse.Namespace) -> int:
    from .wbem.repository import SchemaNotFound
    try:
        setup_schema(args.cache_dir, args.source)
    except (SetupError, SchemaNotFound) as exc:
        print(f"setup-schema: {exc}", file=sys.stderr, flush=True)
        if args.source is None:
            print("on a host without the package index: cim-provider setup-schema --from ZIP",
                  file=sys.stderr, flush=True)
        return 1
    return 0
