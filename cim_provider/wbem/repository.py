"""The class repository: DMTF classes the project needs plus `mof/`, read-only.

Compiling is done with pywbem_mock's in-memory repository, which resolves
inheritance (propagated properties, class origin, qualifier flavors) the way a CIMOM
does. The result is cached as a pickle keyed by the inputs, so start-up stays well
under a second; without a cache a compile takes about half a second here.

Where things are. The project's MOF ships in the package (`cim_provider/mof`, mapped
from the checkout's `mof/` by pyproject.toml). The DMTF schema zip is never shipped:
it lives in a cache directory (`schema/`, next to the compiled classes in `classes/`),
chosen by `resolve_cache_dir`: an explicit directory (`--cache-dir`), else
$CIM_PROVIDER_CACHE_DIR, else the checkout's `build/` when running from a checkout,
else /var/cache/cim-provider as root and $XDG_CACHE_HOME/cim-provider otherwise.
`cim-provider setup-schema` (cim_provider/schema_setup.py) fills it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pywbem
from pywbem import CIMClass, CIMError, CIMQualifierDeclaration

# Where things are: wbem/schema_files.py, which `serve` imports before pywbem.
from .schema_files import (CACHE_DIR_ENV, DEFAULT_MOF_DIR, DEFAULT_SCHEMA_ZIP,  # noqa: F401
                           PROJECT_ROOT, SCHEMA_ZIP_NAME, SchemaNotFound, _mof_dir,
                           class_cache_in, default_cache_dir, resolve_cache_dir,
                           running_from_checkout, schema_zip_in)

log = logging.getLogger(__name__)

# Which MOF file of ours feeds which namespace, and the DMTF classes served as they
# are (no VIRT_ subclass) in that namespace.
NAMESPACE_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "root/virt": ("virt.mof", ()),
    "interop": ("interop.mof", ("CIM_Namespace", "CIM_ObjectManager",
                                # subscriptions (DSP1054), as pywbem's
                                # WBEMSubscriptionManager creates them
                                "CIM_IndicationFilter", "CIM_ListenerDestinationCIMXML",
                                "CIM_IndicationSubscription")),
}


@dataclass
class Namespace:
    """The classes of one namespace, with lookups precomputed for dispatch."""
    name: str
    classes: dict[str, CIMClass]                       # lower-case name -> class
    qualifiers: dict[str, CIMQualifierDeclaration]     # lower-case name -> declaration
    children: dict[str, list[str]] = field(default_factory=dict)  # lower -> direct subclasses
    _supers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cls in self.classes.values():
            if cls.superclass:
                self.children.setdefault(cls.superclass.lower(), []).append(cls.classname)
        for key, cls in self.classes.items():
            chain, sup = [], cls.superclass
            while sup:
                chain.append(sup.lower())
                parent = self.classes.get(sup.lower())
                sup = parent.superclass if parent is not None else None
            self._supers[key] = tuple(chain)

    def get(self, name: str) -> CIMClass | None:
        return self.classes.get(name.lower())

    def require(self, name: str) -> CIMClass:
        """The class `name`, which the caller knows exists: KeyError if it does not."""
        cls = self.classes.get(name.lower())
        if cls is None:
            raise KeyError(f"class {name!r} does not exist in {self.name}")
        return cls

    def is_subclass(self, name: str, base: str) -> bool:
        """True if `name` is `base` or derives from it (case-insensitive)."""
        n, b = name.lower(), base.lower()
        return n == b or b in self._supers.get(n, ())

    def subclasses(self, name: str | None, deep: bool = True) -> list[str]:
        """Direct (or all) subclasses of `name`; of the root when `name` is None."""
        if name is None:
            top = [c.classname for c in self.classes.values() if not c.superclass]
            if not deep:
                return top
            out: list[str] = []
            for t in top:
                out.append(t)
                out.extend(self.subclasses(t, True))
            return out
        out = []
        for child in self.children.get(name.lower(), ()):
            out.append(child)
            if deep:
                out.extend(self.subclasses(child, True))
        return out


class Repository:
    """All namespaces. Lookups raise the CIMError each operation needs."""

    def __init__(self, namespaces: dict[str, Namespace]):
        self._ns = {name.lower(): ns for name, ns in namespaces.items()}

    @property
    def namespace_names(self) -> list[str]:
        return [ns.name for ns in self._ns.values()]

    def namespace(self, name: str | None) -> Namespace:
        ns = self._ns.get((name or "").strip("/").lower())
        if ns is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_NAMESPACE, f"namespace {name!r} does not exist")
        return ns

    @classmethod
    def load(cls, cache_dir: str | os.PathLike[str] | None = None, *,
             schema_zip: Path | None = None, mof_dir: Path | None = None,
             class_cache: bool = True) -> "Repository":
        """Compile (or read from the class cache) the schema and our MOF.

        `cache_dir` as for `resolve_cache_dir`; `schema_zip` overrides the zip in it,
        `mof_dir` the shipped MOF; `class_cache=False` neither reads nor writes the
        compiled classes. SchemaNotFound when the zip is missing."""
        where = resolve_cache_dir(cache_dir)
        schema_zip = Path(schema_zip) if schema_zip is not None else schema_zip_in(where)
        mof_dir = Path(mof_dir) if mof_dir is not None else _mof_dir()
        if not schema_zip.is_file():
            raise SchemaNotFound(where if schema_zip == schema_zip_in(where) else schema_zip.parent)
        key = _cache_key(schema_zip, mof_dir)
        cache = class_cache_in(where) / f"classes-{key}.pickle" if class_cache else None
        if cache is not None and cache.is_file():
            try:
                with cache.open("rb") as f:
                    data = pickle.load(f)
                return cls({n: Namespace(n, c, q) for n, (c, q) in data.items()})
            except Exception as exc:  # a corrupt cache is rebuilt, never fatal
                log.warning("class cache %s unreadable (%s); recompiling", cache, exc)
        data = _compile(schema_zip, mof_dir)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=cache.parent, delete=False) as tmp:
                    pickle.dump(data, tmp, protocol=pickle.HIGHEST_PROTOCOL)
                os.chmod(tmp.name, 0o644)     # like the schema: readable by a non-root serve
                os.replace(tmp.name, cache)
                for stale in cache.parent.glob("classes-*.pickle"):   # older inputs
                    if stale != cache:
                        stale.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot write class cache %s: %s", cache, exc)
        return cls({n: Namespace(n, c, q) for n, (c, q) in data.items()})


def _cache_key(schema_zip: Path, mof_dir: Path) -> str:
    h = hashlib.sha256(pywbem.__version__.encode())
    h.update(str(schema_zip.stat().st_size).encode())
    for mof in sorted(mof_dir.glob("*.mof")):
        h.update(mof.name.encode())
        h.update(mof.read_bytes())
    h.update(repr(sorted(NAMESPACE_SOURCES.items())).encode())
    return h.hexdigest()[:16]


def _compile(schema_zip: Path, mof_dir: Path) -> dict:
    """Compile per namespace: qualifiers, then our MOF (dependencies found in the zip)."""
    import pywbem_mock  # only needed when the cache is cold

    with tempfile.TemporaryDirectory(prefix="cim-schema-") as tmp:
        with zipfile.ZipFile(schema_zip) as z:
            z.extractall(tmp)
        conn = pywbem_mock.FakedWBEMConnection()
        out = {}
        for ns, (mof_file, plain) in NAMESPACE_SOURCES.items():
            conn.add_namespace(ns)
            for q in ("qualifiers.mof", "qualifiers_optional.mof"):
                conn.compile_mof_file(os.path.join(tmp, q), ns)
            conn.compile_mof_file(str(mof_dir / mof_file), ns, search_paths=[tmp])
            if plain:
                conn.compile_mof_string(
                    "".join(f"class VIRT_Tmp{i} : {c} {{}};" for i, c in enumerate(plain)),
                    ns, search_paths=[tmp])
            store = conn.cimrepository.get_class_store(ns)
            classes = {n.lower(): store.get(n) for n in store.iter_names()
                       if not n.startswith("VIRT_Tmp")}
            qstore = conn.cimrepository.get_qualifier_store(ns)
            quals = {n.lower(): qstore.get(n) for n in qstore.iter_names()}
            out[ns] = (classes, quals)
            log.info("compiled %d classes for %s", len(classes), ns)
        return out
