"""Where the class repository's inputs and cache are, importable without pywbem.

wbem/repository.py explains the layout; these are its path rules, apart so that `serve`
can say a schema is missing (schema_setup.schema_missing) before anything heavier is
imported, and start libvirt's open that early (issue 16, start-up).
"""
from __future__ import annotations

import os
from pathlib import Path

SCHEMA_ZIP_NAME = "cim_schema_2.49.0Final-MOFs.zip"
CACHE_DIR_ENV = "CIM_PROVIDER_CACHE_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = _PACKAGE_DIR.parent       # the checkout, when running from one


def running_from_checkout() -> bool:
    """True when the package is imported from the source tree (editable or not)."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "mof").is_dir()


def _mof_dir() -> Path:
    """`cim_provider/mof` when installed; the checkout's `mof/` otherwise."""
    shipped = _PACKAGE_DIR / "mof"
    return shipped if (shipped / "virt.mof").is_file() else PROJECT_ROOT / "mof"


def default_cache_dir() -> Path:
    """/var/cache/cim-provider for root, else $XDG_CACHE_HOME/cim-provider."""
    if os.geteuid() == 0:
        return Path("/var/cache/cim-provider")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cim-provider"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: `cache_dir`, else $CIM_PROVIDER_CACHE_DIR, else the
    checkout's build/ (running from a checkout), else `default_cache_dir()`."""
    if cache_dir:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser().absolute()
    if running_from_checkout():
        return PROJECT_ROOT / "build"
    return default_cache_dir()


def schema_zip_in(cache_dir: Path) -> Path:
    return cache_dir / "schema" / SCHEMA_ZIP_NAME


def class_cache_in(cache_dir: Path) -> Path:
    return cache_dir / "classes"


class SchemaNotFound(FileNotFoundError):
    """The DMTF schema zip is missing; str() is the message for the user."""

    def __init__(self, where: Path):
        self.where = where
        super().__init__(f"DMTF schema not found in {where}: run `cim-provider setup-schema` "
                         f"(or `cim-provider setup-schema --from ZIP`)")

    def __str__(self) -> str:
        return str(self.args[0])


DEFAULT_MOF_DIR = _mof_dir()
# Where Repository.load() looks when given nothing (the environment at import time).
DEFAULT_SCHEMA_ZIP = schema_zip_in(resolve_cache_dir())
