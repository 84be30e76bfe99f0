"""Embedded instances in method parameters (EmbeddedInstance strings), CIM-XML or MOF.

DSP0200 clients send them as escaped CIM-XML; wbemcli users write MOF
(`instance of VIRT_VirtualSystemSettingData { ElementName = "x"; };`). Both become a
CIMInstance typed by the namespace's class; anything else is a ValueError with a
reason fit for CIM_ERR_INVALID_PARAMETER.
"""
from __future__ import annotations

import logging
import re
import threading

from pywbem import CIMInstance, MOFCompiler, MOFWBEMConnection
from pywbem._nocasedict import NocaseDict
from pywbem._tupleparse import TupleParser

from .repository import Namespace
from .xmlparse import XMLRequestError, parse_tupletree

log = logging.getLogger(__name__)
MAX_EMBEDDED = 1024 * 1024
MAX_MOF = 64 * 1024        # an instance of a settings class is a few hundred bytes
_MOF_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MOF_LOCK = threading.Lock()   # one compile at a time: pywbem's compiler is not re-entrant


def parse_embedded_instance(text: object, ns: Namespace) -> CIMInstance:
    if isinstance(text, CIMInstance):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError("not an embedded instance (empty or not a string)")
    if len(text) > MAX_EMBEDDED:
        raise ValueError("embedded instance too large")
    s = text.strip()
    if s.startswith("<"):
        try:
            tree = parse_tupletree(s.encode("utf-8"), 32)
            if tree[0] != "INSTANCE":
                raise ValueError(f"embedded CIM-XML is a {tree[0]}, not an INSTANCE")
            inst = TupleParser().parse_instance(tree)
        except XMLRequestError as exc:
            raise ValueError(f"embedded CIM-XML: {exc.reason}") from None
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"embedded CIM-XML: {str(exc).splitlines()[0][:200]}") from None
    else:
        inst = _from_mof(s, ns)
    if ns.get(inst.classname) is None:
        raise ValueError(f"embedded instance of unknown class {inst.classname!r}")
    return inst


class _Quiet:
    """Sink for the MOF compiler's messages: they go to our log at debug level."""
    @staticmethod
    def __call__(msg: str, *args, **kwargs) -> None:
        log.debug("MOF: %s", msg)


def _from_mof(text: str, ns: Namespace) -> CIMInstance:
    if len(text) > MAX_MOF:
        raise ValueError(f"embedded MOF larger than {MAX_MOF} bytes")
    # `#pragma include(...)` would make the compiler open a file of the server's
    # choosing by the client's name (and a FIFO would hang it): no pragmas at all.
    if "#" in _MOF_STRINGS.sub('""', text):
        raise ValueError("embedded MOF may not contain #pragma or other directives")
    handle = MOFWBEMConnection()
    handle.classes[ns.name] = NocaseDict({c.classname: c for c in ns.classes.values()})
    handle.qualifiers[ns.name] = NocaseDict({q.name: q for q in ns.qualifiers.values()})
    compiler = MOFCompiler(handle, log_func=_Quiet())
    if not text.endswith(";"):      # `instance of X { ... }` as wbemcli users type it
        text += ";"
    try:
        with _MOF_LOCK:
            result = compiler.compile_embedded_value(text, ns.name)
    except Exception as exc:
        raise ValueError(f"embedded MOF: {str(exc).strip().splitlines()[0][:200]}") from None
    insts = [r for r in (result or []) if isinstance(r, CIMInstance)]
    if len(insts) != 1:
        raise ValueError(f"embedded MOF must hold exactly one instance, not {len(insts)}")
    return insts[0]
