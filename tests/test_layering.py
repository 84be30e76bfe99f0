"""The package layering of docs/architecture.md ("Layers"), read from the source.

Every import statement of every module (top level or inside a function) is read with
`ast`, relative imports resolved, so a lazy import inside a function counts as much as
one at the top. Each rule is (package, forbidden import prefixes).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cim_provider"

# (package or module of cim_provider, imports it must never make, why)
RULES = [
    ("wbem", ("aiohttp", "libvirt", "libvirtaio", "dbus_fast", "dbus_next",
              "cim_provider.contract.bus", "cim_provider.server", "cim_provider.sources",
              "cim_provider.providers", "cim_provider.manager", "cim_provider.inventory"),
     "the protocol core does no I/O and knows no domain"),
    ("domain", ("pywbem", "aiohttp", "libvirt", "libvirtaio", "dbus_fast", "dbus_next",
                "cim_provider.wbem", "cim_provider.server", "cim_provider.sources",
                "cim_provider.providers", "cim_provider.manager", "cim_provider.inventory",
                "cim_provider.contract"),
     "shared records and contracts, pure"),
    ("inventory", ("pywbem", "aiohttp", "libvirt", "dbus_fast", "dbus_next",
                   "cim_provider.wbem", "cim_provider.server", "cim_provider.sources",
                   "cim_provider.providers"),
     "the merge knows nothing of CIM or of where records come from"),
    ("manager", ("pywbem", "cim_provider.sources", "cim_provider.providers",
                 "cim_provider.wbem", "cim_provider.server", "cim_provider.inventory"),
     "the reference Manager is another program: domain/ and contract/ only"),
    ("providers", ("cim_provider.sources", "aiohttp", "libvirt", "dbus_fast", "dbus_next",
                   "cim_provider.server", "cim_provider.contract"),
     "providers act through domain.sources Protocols"),
    ("sources", ("pywbem", "aiohttp", "cim_provider.wbem", "cim_provider.server",
                 "cim_provider.providers"),
     "sources produce domain records, not CIM"),
    ("contract", ("pywbem", "aiohttp", "libvirt", "cim_provider.wbem", "cim_provider.server",
                  "cim_provider.sources", "cim_provider.providers", "cim_provider.manager"),
     "the D-Bus contract is shared by client and service"),
    ("indications", ("libvirt", "dbus_fast", "dbus_next", "cim_provider.sources",
                     "cim_provider.server"),
     "the indication service is fed the inventory by the server"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            # `from . import security` imports a module, not a name
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    root = PKG / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    assert files, f"no modules under {root}"
    found = []
    for f in files:
        for name in sorted(imports_of(f)):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{f.relative_to(PKG.parent)} imports {name}")
    return found


@pytest.mark.parametrize("package,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_layer(package: str, forbidden: tuple[str, ...], why: str) -> None:
    assert violations(package, forbidden) == [], why


def test_the_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself can fail: a function-level relative import is reported."""
    sample = PKG / "providers" / "computer_system.py"
    names = imports_of(sample)
    assert "cim_provider.domain.sources" in names          # relative, resolved
    assert "pywbem" in names
    fake = PKG / "providers" / "_layering_probe.py"
    fake.write_text("def f():\n    from ..sources import libvirt\n")
    try:
        assert violations("providers", ("cim_provider.sources",)) == [
            "cim_provider/providers/_layering_probe.py imports cim_provider.sources",
            "cim_provider/providers/_layering_probe.py imports cim_provider.sources.libvirt"]
    finally:
        fake.unlink()


def test_module_size() -> None:
    """No module over ~500 lines unless its docstring says why (docs/architecture.md)."""
    big = []
    for f in sorted(PKG.rglob("*.py")):
        lines = f.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        if lines > 520 and "lines" not in doc.lower():
            big.append(f"{f.relative_to(PKG.parent)} ({lines} lines)")
    assert big == []
