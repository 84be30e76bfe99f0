"""The network side of the WBEM server: HTTP(S) listeners, connection limits,
authentication, TLS, the exposure rules and the wiring of sources, providers and
dispatcher into one running server (`main`). The CIM protocol itself is in `wbem/`,
which does no I/O (docs/architecture.md, "Layers")."""
