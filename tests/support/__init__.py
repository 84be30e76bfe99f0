"""Helpers shared by tests: a private dbus-daemon, a minimal Manager."""
