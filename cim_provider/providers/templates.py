"""The Manager's templates as DSP1057 reference configurations.

Each template is a VIRT_VirtualSystemSettingData with InstanceID `VIRT:template:<name>`
(ElementName its name, Description its description, ConfigurationID its version,
TemplateVariables its variables as `name=type:default`, `name=type` when required),
associated to the management service with VIRT_ElementSettingData. DefineSystem with
ReferenceConfiguration = one of them defines from the template (Manager
DefineFromTemplate): ElementName is the name, a processor RASD the variable `vcpus`,
a memory RASD `memory_kib`, and the embedded VSSD's TemplateVariables (`name=value`
strings) the others.

The templates come from the Manager client's last ListTemplates (re-read when the
Manager says they changed); no CIM request calls the Manager to show them.
Converters: `template_values` (a template -> properties), `template_name` (a path ->
the template it names), `variables_from_settings` (DefineSystem's embedded instances ->
DefineFromTemplate's variables).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.sources import NotFound, NotSupported, Refused, SourceError
from ..wbem.provider import path_key
from .backend import DEFINED_PREFIX, STATE_PREFIX, VIRT_NS, Backend, make
from .computer_system import system_path

VSSD_CLASS = "VIRT_VirtualSystemSettingData"
ESD_CLASS = "VIRT_ElementSettingData"
TEMPLATE_PREFIX = "VIRT:template:"
RC_OK, RC_NOT_SUPPORTED = 0, 1
RT_PROCESSOR, RT_MEMORY = 3, 4
# the variables processor and memory settings fill (templates.py of the Manager)
VCPUS_VARIABLE, MEMORY_VARIABLE = "vcpus", "memory_kib"


class TemplateSource(Protocol):
    """What this module uses of the Manager client beyond DefinitionSource."""
    templates: list[dict[str, Any]] | None

    async def define_from_template(self, template: str,
                                   variables: Mapping[str, Any]) -> str: ...


def template_path(name: str) -> CIMInstanceName:
    return CIMInstanceName(VSSD_CLASS, {"InstanceID": TEMPLATE_PREFIX + name}, namespace=VIRT_NS)


def template_name(path: Any) -> str | None:
    """The template a VSSD path names (`VIRT:template:<name>`), else None."""
    if not isinstance(path, CIMInstanceName):
        return None
    iid = path.keybindings.get("InstanceID")
    if isinstance(iid, str) and iid.startswith(TEMPLATE_PREFIX) and len(iid) > len(TEMPLATE_PREFIX):
        return iid[len(TEMPLATE_PREFIX):]
    return None


def variable_spec(var: Mapping[str, Any]) -> str:
    """`name=type:default`, or `name=type` for a required variable."""
    default = var.get("Default")
    if default is None:
        return f"{var['Name']}={var['Type']}"
    if isinstance(default, bool):
        default = "true" if default else "false"
    return f"{var['Name']}={var['Type']}:{default}"


def template_values(t: Mapping[str, Any]) -> dict[str, Any]:
    name = t["Name"]
    return {
        "InstanceID": TEMPLATE_PREFIX + name,
        "ElementName": name,
        "Caption": f"Template {name}",
        "Description": t.get("Description") or None,
        "ConfigurationName": "template",
        "ConfigurationID": t.get("Version") or None,
        "ChangeableType": 0,                # not changeable through CIM, persistent
        "TemplateVariables": [variable_spec(v) for v in t.get("Variables") or ()],
    }


def _memory_kib(rasd: CIMInstance) -> int:
    from .management_service import _memory_kib as memory_kib   # one reading of units
    kib = memory_kib(rasd)
    if kib is None:
        raise ValueError("VirtualQuantity is required")
    return kib


def variables_from_settings(vssd: CIMInstance, rasds: Sequence[CIMInstance]) -> dict[str, Any]:
    """DefineSystem's SystemSettings and ResourceSettings -> DefineFromTemplate's
    variables (values as the client gave them; the Manager checks their types)."""
    name = vssd.get("ElementName") or vssd.get("VirtualSystemIdentifier")
    if not name:
        raise ValueError("SystemSettings needs ElementName (the domain name)")
    out: dict[str, Any] = {"name": str(name)}
    for i, text in enumerate(vssd.get("TemplateVariables") or ()):
        where = f"SystemSettings.TemplateVariables[{i}]"
        var, eq, given = str(text).partition("=")
        var = var.strip()
        if not eq or not var:
            raise ValueError(f"{where}: {str(text)[:60]!r} is not name=value")
        if var == "name":
            raise ValueError(f"{where}: the name is ElementName, not a variable")
        if var in out:
            raise ValueError(f"{where}: variable {var[:64]} is given twice")
        out[var] = given
    for i, r in enumerate(rasds):
        rt = r.get("ResourceType")
        rt = int(rt) if rt is not None else None
        where = f"ResourceSettings[{i}]"
        key: str
        value: Any
        try:
            if rt == RT_PROCESSOR and r.get("VirtualQuantity") is not None:
                key, value = VCPUS_VARIABLE, int(r["VirtualQuantity"])
            elif rt == RT_MEMORY:
                key, value = MEMORY_VARIABLE, _memory_kib(r)
            else:
                raise ValueError("a system defined from a template takes processor (3) and "
                                 "memory (4) settings only; its other devices come from the "
                                 "template")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if key in out:
            raise ValueError(f"{where}: variable {key} is given twice")
        out[key] = value
    return out


class Templates:
    """The template VSSDs and their ElementSettingData, for SettingsProvider (hook
    `templates`) and AssociationsProvider (an extension); DefineSystem from one."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self._source: Any = None
        self._instances: list[CIMInstance] = []
        self._links: list[CIMInstance] = []

    def _current(self) -> tuple[list[CIMInstance], list[CIMInstance]]:
        """(VSSDs, ElementSettingData), rebuilt when the client read the templates again."""
        listed = getattr(self.b.manager, "templates", None) if self.b.manager is not None \
            and self.b.manager.present else None
        if listed is not self._source:
            self._source = listed
            self._instances = [make(self.b, VSSD_CLASS, template_values(t),
                                    template_path(t["Name"])) for t in listed or ()]
            vsms = self.b.vsms_path()
            self._links = [make(self.b, ESD_CLASS, {"ManagedElement": vsms,
                                                    "SettingData": inst.path,
                                                    "IsDefault": 2, "IsCurrent": 2},
                                CIMInstanceName(ESD_CLASS, {"ManagedElement": vsms,
                                                            "SettingData": inst.path},
                                                namespace=VIRT_NS))
                           for inst in self._instances]
        return self._instances, self._links

    # SettingsProvider's hook: the instances of a class, and one by InstanceID

    def settings(self, classname: str) -> list[CIMInstance]:
        return list(self._current()[0]) if classname.lower() == VSSD_CLASS.lower() else []

    def find(self, iid: str) -> CIMInstance | None:
        return next((i for i in self._current()[0] if i["InstanceID"] == iid), None)

    # AssociationsProvider's extension

    def extension_enumerate(self, cls: str) -> list[CIMInstance]:
        return list(self._current()[1]) if cls.lower() == ESD_CLASS.lower() else []

    def extension_references(self, cls: str, source: CIMInstanceName) -> list[CIMInstance]:
        if cls.lower() != ESD_CLASS.lower():
            return []
        scls = source.classname.lower()
        if scls != VSSD_CLASS.lower() and scls != self.b.vsms_path().classname.lower():
            return []
        key = path_key(source, VIRT_NS)
        return [a for a in self._current()[1]
                if key in (path_key(a["ManagedElement"]), path_key(a["SettingData"]))]

    # DefineSystem with a ReferenceConfiguration

    async def define_system(self, vssd: CIMInstance, rasds: Sequence[CIMInstance],
                            reference: Any) -> tuple[int, dict[str, Any]]:
        name = template_name(reference)
        if name is None:
            iid = reference.keybindings.get("InstanceID") \
                if isinstance(reference, CIMInstanceName) else None
            if isinstance(iid, str) and iid.startswith((DEFINED_PREFIX, STATE_PREFIX)):
                raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                               "ReferenceConfiguration: only a template (VIRT:template:<name>) "
                               "can be the reference configuration")
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "ReferenceConfiguration must name a template: "
                           "VIRT_VirtualSystemSettingData.InstanceID=\"VIRT:template:<name>\"")
        try:
            variables = variables_from_settings(vssd, rasds)
        except (ValueError, TypeError) as exc:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, str(exc)) from None
        manager = self.b.require_manager()
        if not manager.offers("DefineFromTemplate"):
            return RC_NOT_SUPPORTED, {}
        source: TemplateSource = manager         # type: ignore[assignment]  # reason: offered, checked above
        try:
            uuid = await source.define_from_template(name, variables)
        except NotFound as exc:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                           f"ReferenceConfiguration: {exc.message}") from None
        except NotSupported:
            return RC_NOT_SUPPORTED, {}
        except Refused as exc:
            if (exc.name or "").endswith(".InvalidArgument"):
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, exc.message) from None
            raise CIMError(pywbem.CIM_ERR_FAILED,
                           f"the Manager could not define the system: {exc.message}") from None
        except SourceError as exc:
            raise CIMError(pywbem.CIM_ERR_FAILED,
                           f"the Manager could not define the system: {exc.message}") from None
        await self.b.settle_defined()
        return RC_OK, {"ResultingSystem": system_path(uuid)}
