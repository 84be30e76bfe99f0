"""The provider contract and the registry, the one place that maps class -> provider.

What the dispatcher has already done before it calls a provider:
- the namespace exists and the class is one this provider registered;
- an instance path has exactly the class's key properties, converted to their
  declared types, with the canonical namespace set;
- extrinsic method parameters are converted to their declared types and unknown
  ones rejected; the target instance of an instance method exists.

What the provider must do:
- `get_instance`: raise CIM_ERR_NOT_FOUND when the keys name no instance;
- return complete instances with their paths (the dispatcher applies PropertyList,
  DeepInheritance, IncludeClassOrigin and sets namespace and host);
- `invoke_method`: raise CIM_ERR_INVALID_PARAMETER for values it cannot accept,
  CIM_ERR_NOT_SUPPORTED for methods it does not implement, CIM_ERR_FAILED with a
  message for anything that went wrong underneath;
- `create_instance` / `modify_instance` / `delete_instance` (optional, default
  CIM_ERR_NOT_SUPPORTED): the dispatcher has already refused callers without the
  operator role and checked the properties against the class.

What the dispatcher may rely on, so that reads cost little at 10,000 systems:
- an instance is never changed once returned; an `Instance` (see instance.py, built
  with `build_instance`) keeps its rendered CIM-XML, so a provider that returns the
  same Instance again while nothing changed has it sent without rendering;
- an enumeration returned as a tuple is immutable: when a provider returns the very
  same tuple object again, the dispatcher reuses what it rendered of it last time.
  A provider whose enumeration changed returns a new tuple (or a list: never cached).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pywbem
from pywbem import CIMClassName, CIMError, CIMInstance, CIMInstanceName

from .instance import Instance, build_instance, reference_values

__all__ = ["Instance", "build_instance", "reference_values", "Provider",
           "AssociationProvider", "Registry", "path_key", "object_key"]

log = logging.getLogger(__name__)


class Provider:
    """Serves the instances of some leaf classes in one namespace."""

    namespace: str = "root/virt"
    classnames: tuple[str, ...] = ()

    async def close(self) -> None:
        """Stop what the provider runs in the background. The server calls it once,
        when it stops (after the last request); the default has nothing to stop."""

    def instance_by_keys(self, classname: str, keys: Mapping[str, str]) -> CIMInstance | None:
        """What `get_instance` returns for a path of `classname` with these keys (the
        class's key names exactly, every value a string), None when they name no
        instance: the dispatcher then asks `get_instance`, which raises the error.
        Synchronous, and the same instance get_instance would return. A provider that
        overrides it lets the dispatcher keep GetInstance plans for its classes
        (Dispatcher.quick_get)."""
        return None

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return ()

    async def enumerate_instance_names(self, classname: str) -> Iterable[CIMInstanceName]:
        return [inst.path for inst in await self.enumerate_instances(classname)]

    # Pull operations (DSP0200 5.4) take an enumeration page by page: a snapshot of its
    # keys when the context opens, the instances of each page when it is pulled
    # (docs/architecture.md, "Data flow": pull contexts). The defaults take the
    # instances themselves as keys; a provider that can make an instance from a key
    # (a record) overrides both, so that no context makes them all at once and a page
    # leaves out what went away since the Open.

    async def enumerate_keys(self, classname: str) -> Sequence[Any]:
        """The enumeration's keys in order: an immutable snapshot (a tuple) that only
        `instances_of` reads. Default: the instances."""
        insts = await self.enumerate_instances(classname)
        return insts if type(insts) is tuple else tuple(insts)

    async def instances_of(self, classname: str, keys: Sequence[Any], start: int,
                           stop: int) -> Sequence[CIMInstance]:
        """The instances of `keys[start:stop]` as they are now, in order, leaving out
        those gone since `keys` was taken. Default: the keys (instances) as taken."""
        return keys[start:stop]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        for inst in await self.enumerate_instances(path.classname):
            if path_key(inst.path) == path_key(path):
                return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no instance {path}")

    async def invoke_method(self, target: CIMInstanceName | CIMClassName, method: str,
                            params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                       f"method {method} is not supported on {target.classname}")

    # Writes. The dispatcher has checked the caller's role, that every property is
    # declared by the class and typed as declared, and (delete, modify) normalized the
    # path; a provider that keeps its instances read-only leaves these alone.

    async def create_instance(self, instance: CIMInstance, ctx: Any) -> CIMInstanceName:
        """Create `instance` (its class is one of ours); return its path.
        CIM_ERR_ALREADY_EXISTS / CIM_ERR_INVALID_PARAMETER for what cannot be created."""
        raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                       f"instances of {instance.classname} cannot be created")

    async def modify_instance(self, instance: CIMInstance, property_list: list[str] | None,
                              ctx: Any) -> None:
        """Change the properties of `instance.path` (only those in `property_list`)."""
        raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                       f"instances of {instance.classname} cannot be modified")

    async def delete_instance(self, path: CIMInstanceName, ctx: Any) -> None:
        """Delete the instance at `path`; CIM_ERR_NOT_FOUND when there is none."""
        raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                       f"instances of {path.classname} cannot be deleted")


class AssociationProvider(Provider):
    """Serves association instances; `references` finds those that name an object."""

    async def references(self, classname: str,
                         source: CIMInstanceName) -> Iterable[CIMInstance]:
        """Association instances of `classname` with any reference equal to `source`."""
        out = []
        key = path_key(source)
        for inst in await self.enumerate_instances(classname):
            if any(path_key(value) == key for _name, value in reference_values(inst)):
                out.append(inst)
        return out

    def associated(self, classname: str,
                   source: CIMInstanceName) -> Sequence[tuple[str, str, CIMInstance]] | None:
        """The objects associated with `source` through `classname`, without making the
        association instances: (role that names `source`, role that names the object,
        the object as its own provider's `get_instance` returns it, with its path).
        None (the default): the dispatcher walks `references` instead. Worth it where
        one source names thousands of objects (HostedDependency from the host: an
        association instance per guest made and dropped per walk; issue 16)."""
        return None


class Registry:
    """(namespace, class) -> provider; enumerations fan out to every registered subclass."""

    def __init__(self) -> None:
        self._by_class: dict[tuple[str, str], Provider] = {}
        self.generation = 0             # bumped by add(): what the dispatcher derived is stale

    def add(self, provider: Provider) -> None:
        for cls in provider.classnames:
            key = (provider.namespace.lower(), cls.lower())
            if key in self._by_class:
                raise ValueError(f"two providers for {cls} in {provider.namespace}")
            self._by_class[key] = provider
        self.generation += 1

    def provider(self, namespace: str, classname: str) -> Provider | None:
        return self._by_class.get((namespace.lower(), classname.lower()))

    def classes(self, namespace: str) -> list[str]:
        ns = namespace.lower()
        return [cls for (n, cls) in self._by_class if n == ns]

    async def close(self) -> None:
        """Close every registered provider, each once (one may serve several classes)."""
        providers = {id(p): p for p in self._by_class.values()}
        for prov in providers.values():
            try:
                await prov.close()
            except Exception:
                log.exception("closing provider %s failed", type(prov).__name__)


def _norm_value(value: Any) -> Any:
    if isinstance(value, CIMInstanceName):
        return path_key(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return value
    return str(value)


def path_key(path: CIMInstanceName, namespace: str | None = None) -> tuple:
    """A hashable identity of an instance path: namespace, class and keys, host ignored."""
    ns = (path.namespace or namespace or "").strip("/").lower()
    return (ns, path.classname.lower(),
            tuple(sorted((k.lower(), _norm_value(v)) for k, v in path.keybindings.items())))


def object_key(obj: Any, namespace: str | None = None) -> tuple:
    """`path_key` of a path, or of an instance's path: an Instance whose keys are all
    strings gives it without making its path object."""
    if isinstance(obj, CIMInstanceName):
        return path_key(obj, namespace)
    parts = obj.path_parts() if isinstance(obj, Instance) else None
    if parts is None or not all(type(v) is str for v in parts[2]):
        return path_key(obj.path, namespace)
    classname, keys, values, ns = parts
    return ((ns or namespace or "").strip("/").lower(), classname.lower(),
            tuple(sorted((k.lower(), v) for k, v in zip(keys, values))))
