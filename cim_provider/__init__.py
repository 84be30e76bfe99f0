"""cim-provider: libvirt domains and a D-Bus Manager's passive domains as DMTF CIM."""

__version__ = "0.1.0"
