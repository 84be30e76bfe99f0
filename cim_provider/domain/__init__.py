"""What every side shares: CIM-free domain records, the libvirt domain-XML converters,
the defaults both the server and the reference Manager apply, and the contract that
sources offer to the providers (`RunningSource`, `DefinitionSource`, their errors).

Nothing here imports pywbem, aiohttp, libvirt or D-Bus (docs/architecture.md, "Layers").
"""
