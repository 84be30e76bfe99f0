"""Templates: libvirt domain XML with variables, rendered by the reference Manager.

A template is one file `NAME.xml.j2` in the templates directory (`--templates DIR`).
It starts with a Jinja comment that describes it and declares its variables:

    {#
    A small server: one disk, one NIC.
    @var vcpus: int[1..64] = 1 -- virtual CPUs
    @var memory_kib: int[65536..] = 524288 -- memory in KiB
    @var owner: string -- who asked for it (no default: required)
    #}
    <domain type='{{ hypervisor }}'><name>{{ name }}</name><uuid>{{ uuid }}</uuid>...

Every line of the comment that does not start with `@var` is the description. Types:
`string`, `int` (optionally `int[MIN..MAX]`, either bound may be left out), `bool`.
Built in, never declared: `name` and `uuid` (the definition's), `hypervisor` (the
libvirt domain type for this host: `kvm`, `test`, ...) and `mac(n)` (a stable MAC
address for the n-th NIC, derived from the UUID).

Safety: rendering uses Jinja's sandboxed environment (ImmutableSandboxedEnvironment),
StrictUndefined, and autoescaping, so every value is XML-escaped and no variable can
add an element or an attribute. A template renders from its own text only: there is
no loader, and a template that uses include, import, extends, `{% autoescape %}` or
the `safe` filter, or a variable it does not declare, is refused when it is loaded
(with its file and line in the log). Values are checked against their declaration
(type, range, at most 4096 characters, no control characters) before rendering; the
result must be one libvirt <domain> with the definition's UUID and name, within the
contract's limits. Every failure is a TemplateError whose message names the
variable or the line, for Error.InvalidArgument.

Disks: the Manager hands a resolver in (`resolve`, `TemplateLibrary.resolver`: the
rendered XML's disks as what their sources are, manager/disks.py), so a templated
definition's disks get their type and image format like an ordinary definition's; the
config then carries them (the contract's Type and Format keys).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..contract import (MAX_STRING, MAX_VARIABLES, InvalidEntry, config_from_values,
                        config_to_values)
from ..domain.domxml import DomainXMLError, parse_domain_xml
from ..domain.records import DomainConfig

log = logging.getLogger(__name__)

SUFFIX = ".xml.j2"
MAX_TEMPLATE = 256 * 1024          # bytes of one template file
MAX_RENDERED = 1024 * 1024         # bytes of one rendered domain XML
BUILTINS = frozenset({"name", "uuid", "hypervisor", "mac"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")        # template names
_VAR = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")                      # variable names
_VAR_LINE = re.compile(r"^@var\s+(?P<name>\S+?)\s*:\s*(?P<type>[a-z]+)"
                       r"(?:\[(?P<min>-?\d*)\.\.(?P<max>-?\d*)\])?"
                       r"(?:\s*=\s*(?P<default>.*?))?(?:\s+--\s*(?P<text>.*))?\s*$")
_TYPES = {"string": "string", "str": "string", "int": "int", "integer": "int",
          "bool": "bool", "boolean": "bool"}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
# XML 1.0 forbids these characters anywhere; refusing them names the variable
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class TemplateError(ValueError):
    """A template or its variables cannot make a domain; the message says why."""


class UnknownTemplate(LookupError):
    """No template of that name."""


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    type: str                        # string | int | bool
    default: Any = None              # None: required
    description: str = ""
    minimum: int | None = None       # int only
    maximum: int | None = None

    def spec(self) -> str:
        """`name=type:default` (`name=type` when required), as CIM shows it."""
        if self.default is None:
            return f"{self.name}={self.type}"
        default = ("true" if self.default else "false") if self.type == "bool" else self.default
        return f"{self.name}={self.type}:{default}"

    def coerce(self, value: Any, where: str) -> Any:
        """`value` as this variable's type, or TemplateError naming `where`. A string
        is accepted for every type (command-line tools and CIM send strings)."""
        if self.type == "string":
            if not isinstance(value, str):
                raise TemplateError(f"{where} must be a string, not {_kind(value)}")
            if len(value) > MAX_STRING:
                raise TemplateError(f"{where} is longer than {MAX_STRING} characters "
                                    f"({len(value)})")
            bad = _CONTROL.search(value)
            if bad:
                raise TemplateError(f"{where} contains the control character "
                                    f"U+{ord(bad.group()):04X}, which XML cannot carry")
            return value
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise TemplateError(f"{where} must be a boolean (true or false), not "
                                f"{_shown(value)}")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TemplateError(f"{where} must be an integer, not {_kind(value)}")
        if isinstance(value, str):
            text = value.strip()
            if not re.fullmatch(r"[+-]?\d{1,20}", text):
                raise TemplateError(f"{where} must be an integer, not {_shown(value)}")
            value = int(text)
        if self.minimum is not None and value < self.minimum:
            raise TemplateError(f"{where} is {value}, less than its minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise TemplateError(f"{where} is {value}, more than its maximum {self.maximum}")
        return value


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    description: str
    variables: tuple[Variable, ...]
    version: str                       # sha256 of the file's text (first 16 hex digits)
    compiled: Any = field(compare=False, repr=False)

    def variable(self, name: str) -> Variable | None:
        return next((v for v in self.variables if v.name == name), None)

    def check(self, given: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """The given variables typed as declared (defaults not added). `strict`: a
        variable the template does not declare is an error (else it is dropped:
        a stored definition may outlive a variable the template no longer has)."""
        if len(given) > MAX_VARIABLES:
            raise TemplateError(f"{len(given)} variables (at most {MAX_VARIABLES})")
        out: dict[str, Any] = {}
        for key, value in given.items():
            var = self.variable(key)
            if var is None:
                if strict:
                    known = ", ".join(v.name for v in self.variables) or "none"
                    raise TemplateError(f"template {self.name} has no variable {key[:64]!r} "
                                        f"(it declares: {known}; built in: name, uuid)")
                continue
            out[key] = var.coerce(value, f"variable {key}")
        return out

    def render(self, uuid: str, name: str, given: Mapping[str, Any],
               hypervisor: str, resolve: Callable[[str], str] | None = None
               ) -> tuple[str, DomainConfig]:
        """(domain XML, its DomainConfig) for one definition, or TemplateError.
        `resolve`: rewrites the rendered XML (its disks, manager/disks.py) once it has
        passed the checks on its text."""
        values = self.check(given, strict=False)
        context: dict[str, Any] = {}
        for var in self.variables:
            if var.name in values:
                context[var.name] = values[var.name]
            elif var.default is not None:
                context[var.name] = var.default
            else:
                raise TemplateError(f"variable {var.name} is required by template "
                                    f"{self.name} ({var.description or var.type})")
        context.update(name=name, uuid=uuid, hypervisor=hypervisor, mac=_mac_maker(uuid))
        try:
            xml = self.compiled.render(context)
        except JinjaError as exc:
            raise TemplateError(f"template {self.name}, line {_line(exc) or '?'}: "
                                f"{_message(exc)}") from None
        except Exception as exc:        # the template's own arithmetic, a bad filter call
            raise TemplateError(f"template {self.name}, line {_line(exc) or '?'}: "
                                f"{type(exc).__name__}: {exc}") from None
        if resolve is not None:
            self._check_text(xml)
            xml = resolve(xml)
        return xml, self._config(xml, uuid, name)

    def _check_text(self, xml: str) -> None:
        if len(xml) > MAX_RENDERED:
            raise TemplateError(f"template {self.name} renders {len(xml)} characters "
                                f"(at most {MAX_RENDERED})")
        if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
            raise TemplateError(f"template {self.name} renders a DOCTYPE or ENTITY, which "
                                "libvirt domain XML never needs")

    def _config(self, xml: str, uuid: str, name: str) -> DomainConfig:
        self._check_text(xml)
        try:
            # detail: the disks' type and <driver> format are part of the definition
            cfg = parse_domain_xml(xml, detail=True)
        except DomainXMLError as exc:
            raise TemplateError(f"template {self.name} renders invalid domain XML: "
                                f"{exc}{_bad_line(xml, exc)}") from None
        if cfg.uuid != uuid or cfg.name != name:
            raise TemplateError(f"template {self.name} must render <uuid>{{{{ uuid }}}}</uuid> "
                                "and <name>{{ name }}</name> (it renders uuid "
                                f"{cfg.uuid} and name {cfg.name[:64]!r})")
        try:   # the contract's limits (vCPUs, sizes, devices), as any entry
            return config_from_values(config_to_values(cfg))
        except InvalidEntry as exc:
            raise TemplateError(f"template {self.name} renders a domain outside the "
                                f"contract's limits: {exc}") from None


def _mac_maker(uuid: str) -> Any:
    def mac(n: int = 0) -> str:
        """A stable, locally administered MAC for NIC `n` of this domain."""
        digest = hashlib.sha256(f"{uuid}/{int(n)}".encode()).digest()
        return "52:54:" + ":".join(f"{b:02x}" for b in digest[:4])
    return mac


def _line(exc: BaseException) -> int | None:
    """The template line a rendering error happened on (Jinja rewrites tracebacks)."""
    line = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, SecurityError):
        return f"refused by the sandbox: {text}"
    return text


def _bad_line(xml: str, exc: Exception) -> str:
    m = re.search(r"line (\d+)", str(exc))
    if not m:
        return ""
    lines = xml.splitlines()
    n = int(m.group(1))
    if 1 <= n <= len(lines):
        return f" (rendered line {n}: {lines[n - 1].strip()[:120]!r})"
    return ""


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(autoescape=True, undefined=StrictUndefined,
                                        loader=None, trim_blocks=True, lstrip_blocks=True,
                                        keep_trailing_newline=True)
    env.globals = {"range": env.globals["range"]}     # no lipsum, dict, cycler, namespace
    env.filters.pop("safe", None)
    return env


_ENV = _environment()
_ENV_LOCK = threading.Lock()        # compiling is not documented as thread-safe
_FORBIDDEN = {nodes.Extends: "{% extends %}", nodes.Include: "{% include %}",
              nodes.Import: "{% import %}", nodes.FromImport: "{% from ... import %}",
              nodes.EvalContextModifier: "{% autoescape %}"}


def parse_header(text: str, name: str) -> tuple[str, tuple[Variable, ...]]:
    """(description, variables) from the leading `{# ... #}` comment, or TemplateError."""
    m = re.match(r"\s*\{#-?(.*?)-?#\}", text, re.S)
    if m is None:
        return "", ()
    first_line = text[:m.start(1)].count("\n") + 1
    description: list[str] = []
    variables: list[Variable] = []
    for i, raw in enumerate(m.group(1).splitlines()):
        line = raw.strip()
        where = f"template {name}, line {first_line + i}"
        if not line.startswith("@var"):
            if line:
                description.append(line)
            continue
        vm = _VAR_LINE.match(line)
        if vm is None:
            raise TemplateError(f"{where}: expected '@var NAME: TYPE [= DEFAULT] "
                                "[-- DESCRIPTION]'")
        vname, vtype = vm.group("name"), _TYPES.get(vm.group("type"))
        if not _VAR.match(vname) or vname in BUILTINS:
            raise TemplateError(f"{where}: {vname!r} cannot be a variable name (lower-case "
                                "letters, digits and _; not name, uuid, hypervisor or mac)")
        if vtype is None:
            raise TemplateError(f"{where}: unknown type {vm.group('type')!r} (string, int, "
                                "bool)")
        if any(v.name == vname for v in variables):
            raise TemplateError(f"{where}: variable {vname} is declared twice")
        bounds = (vm.group("min"), vm.group("max"))
        if vm.group("min") is not None and vtype != "int":
            raise TemplateError(f"{where}: only int variables take a range")
        var = Variable(vname, vtype, None, (vm.group("text") or "").strip(),
                       int(bounds[0]) if bounds[0] else None,
                       int(bounds[1]) if bounds[1] else None)
        default = vm.group("default")
        if default is not None:
            default = default.strip()
            if vtype == "string" and default.startswith('"'):
                try:
                    default = json.loads(default)
                except ValueError:
                    raise TemplateError(f"{where}: the default {default!r} is not a "
                                        "quoted string") from None
            var = replace(var, default=var.coerce(default, f"{where}: the default of {vname}"))
        variables.append(var)
    return " ".join(description), tuple(variables)


def load_template(name: str, text: str) -> Template:
    """A Template from a file's text, or TemplateError (with the line)."""
    if not _NAME.match(name):
        raise TemplateError(f"{name!r} is not a template name (letters, digits, '.', '_', "
                            "'-')")
    description, variables = parse_header(text, name)
    try:
        with _ENV_LOCK:
            ast = _ENV.parse(text)
            for node in ast.find_all(tuple(_FORBIDDEN)):
                what = next(v for k, v in _FORBIDDEN.items() if isinstance(node, k))
                raise TemplateError(f"template {name}, line {node.lineno}: {what} is not "
                                    "allowed (a template renders from its own text, with "
                                    "every value escaped)")
            for used in ast.find_all(nodes.Filter):
                if used.name == "safe":
                    raise TemplateError(f"template {name}, line {used.lineno}: the safe filter "
                                        "is not allowed (every value is escaped)")
            undeclared = meta.find_undeclared_variables(ast) - BUILTINS - {"range"} \
                - {v.name for v in variables}
            if undeclared:
                raise TemplateError(f"template {name} uses undeclared variables: "
                                    f"{', '.join(sorted(undeclared))} (declare each with @var)")
            compiled = _ENV.from_string(ast)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template {name}, line {exc.lineno}: {exc.message}") from None
    version = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return Template(name, description, variables, version, compiled)


@dataclass(frozen=True, slots=True)
class _Seen:
    mtime_ns: int
    size: int
    inode: int


class TemplateLibrary:
    """The templates of one directory, re-read when a file's mtime or size changes.

    A template that stops loading (a typo while editing) keeps its last good version
    and logs the error once; a file that goes away takes its template with it.
    `refresh()` is blocking (it reads files) and is called from the Manager's poll.
    """

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.templates: dict[str, Template] = {}
        self._seen: dict[str, _Seen] = {}
        self._broken: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[Any, ...], DomainConfig | TemplateError]] = {}
        # Applied to every rendering `config` lists (the Manager's: disks resolved);
        # blocking, so `config` is called off the event loop, or hits the cache.
        self.resolver: Callable[[str], str] | None = None

    def get(self, name: str) -> Template:
        t = self.templates.get(name)
        if t is None:
            where = (f"in {self.directory}" if self.directory is not None
                     else "(this Manager has no --templates directory)")
            raise UnknownTemplate(f"no template {name[:128]!r} {where}")
        return t

    def refresh(self) -> set[str]:
        """Re-read what changed on disk; the names of templates added, changed or gone."""
        if self.directory is None:
            return set()
        with self._lock:
            return self._refresh()

    def _refresh(self) -> set[str]:
        assert self.directory is not None
        found: dict[str, tuple[Path, _Seen]] = {}
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if not entry.name.endswith(SUFFIX) or not entry.is_file():
                        continue
                    st = entry.stat()
                    found[entry.name[:-len(SUFFIX)]] = (
                        Path(entry.path), _Seen(st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError as exc:
            if "directory" not in self._broken:
                self._broken["directory"] = str(exc)
                log.error("cannot read the templates directory %s: %s", self.directory, exc)
            return set()
        self._broken.pop("directory", None)
        changed: set[str] = set()
        templates = dict(self.templates)
        for name in set(self._seen) - set(found):
            del self._seen[name]
            self._broken.pop(name, None)
            if templates.pop(name, None) is not None:
                changed.add(name)
                log.info("template %s removed", name)
        for name, (path, seen) in found.items():
            if self._seen.get(name) == seen:
                continue
            self._seen[name] = seen
            try:
                if seen.size > MAX_TEMPLATE:
                    raise TemplateError(f"template {name} is larger than {MAX_TEMPLATE} bytes")
                text = path.read_text(encoding="utf-8")
                template = load_template(name, text)
            except (OSError, UnicodeDecodeError, TemplateError) as exc:
                problem = f"{path}: {exc}"
                if self._broken.get(name) != problem:
                    self._broken[name] = problem
                    kept = " (keeping its previous version)" if name in templates else ""
                    log.error("cannot load template %s%s", problem, kept)
                continue
            self._broken.pop(name, None)
            old = templates.get(name)
            if old is None or old.version != template.version:
                templates[name] = template
                changed.add(name)
                log.info("template %s %s (version %s, %d variables)", name,
                         "loaded" if old is None else "changed", template.version,
                         len(template.variables))
        self.templates = templates          # one assignment: readers see old or new
        return changed

    def render(self, template: str, uuid: str, name: str, variables: Mapping[str, Any],
               hypervisor: str, resolve: Callable[[str], str] | None = None
               ) -> tuple[str, DomainConfig]:
        """Render now (StartDomain): (XML, config) or TemplateError / UnknownTemplate."""
        return self.get(template).render(uuid, name, variables, hypervisor, resolve)

    def config(self, uuid: str, name: str, template: str, variables_json: str,
               hypervisor: str) -> DomainConfig:
        """The DomainConfig of a templated definition for the lists, cached by the
        row and the template's version; TemplateError / UnknownTemplate if it cannot
        be rendered (cached too, so a broken row costs one attempt per version)."""
        t = self.templates.get(template)
        key = (name, template, variables_json, t.version if t else None, hypervisor)
        hit = self._cache.get(uuid)
        if hit is not None and hit[0] == key:
            result = hit[1]
        else:
            try:
                if t is None:
                    self.get(template)             # raises UnknownTemplate
                assert t is not None
                result = t.render(uuid, name, json.loads(variables_json), hypervisor,
                                  self.resolver)[1]
            except (TemplateError, UnknownTemplate) as exc:
                result = TemplateError(str(exc.args[0] if exc.args else exc))
            self._cache[uuid] = (key, result)
        if isinstance(result, TemplateError):
            raise TemplateError(str(result))
        return result

    @property
    def cached(self) -> int:
        """How many renderings are cached."""
        return len(self._cache)

    def forget(self, keep: set[str]) -> None:
        """Drop cached renderings of definitions that are gone."""
        for uuid in [u for u in self._cache if u not in keep]:
            del self._cache[uuid]


def variables_json(values: Mapping[str, Any]) -> str:
    """Variables as stored: canonical JSON (sorted keys), so equal rows compare equal."""
    return json.dumps(dict(values), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


__all__ = ["Template", "TemplateLibrary", "TemplateError", "UnknownTemplate", "Variable",
           "load_template", "parse_header", "variables_json", "BUILTINS", "SUFFIX"]
