"""Values a definition gets when it does not say, shared by the server and the Manager.

One place, so that the memory the Manager checks against the host is the memory the
domain XML asks libvirt for.
"""
from __future__ import annotations

DEFAULT_MEMORY_KIB = 131072     # 128 MiB: libvirt's test driver and tiny guests run in it
DEFAULT_VCPUS = 1
DEFAULT_ARCH = "x86_64"
DEFAULT_OS_TYPE = "hvm"
