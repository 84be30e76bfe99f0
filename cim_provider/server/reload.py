"""SIGHUP in `cim-provider serve`: read the configuration file again and apply what
can change without dropping a connection.

Applied live: the log level, the users file (read again now, even if unchanged), the
TLS certificate and key (read again: a rotated pair at the same paths is picked up;
new handshakes use it, established connections keep theirs), the failed-login brake
(`--login-burst`, `--login-refill`) and `--pam-role`. Everything else -- listen
addresses, limits, libvirt and Manager settings, turning authentication on or off --
is only applied by a restart; the log names what changed.

All or nothing: the new users file and TLS pair are loaded and checked before anything
is applied, so a reload that fails (a broken file, an unreadable users file, a key that
does not match) changes nothing and says why at ERROR. Then the hooks of
`ServerHandle.on_reload` run (log files to reopen, ...), whether or not the settings
could be read.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from .. import logsetup
from .auth import Authenticator, UsersFile, UsersFileError
from .config import ConfigError, changed_options, option_name
from .notify import Notifier
from .tls import CERT_NAME, KEY_NAME, server_context

log = logging.getLogger(__name__)

LIVE = ("log_level", "users", "cert", "key", "login_burst", "login_refill", "pam_role")


class ReloadError(Exception):
    """Why a reload was refused; nothing was applied."""


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _in_memory(path: Path, fds: list[int]) -> str:
    """A path to a private in-memory copy of `path` (a memfd; the key never touches
    the disk again), valid until the fd appended to `fds` is closed."""
    data = Path(path).read_bytes()
    fd = os.memfd_create("cim-provider-tls", os.MFD_CLOEXEC)
    fds.append(fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return f"/proc/self/fd/{fd}"


class Reloader:
    """Holds the running options and applies a new set on `reload()`."""

    def __init__(self, args: argparse.Namespace, *, ssl_context: ssl.SSLContext | None,
                 authenticate: object | None, state_dir: Path | None,
                 hooks: list[Callable[[], None]] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.args = args
        self.ssl_context = ssl_context
        self.authenticate = authenticate if isinstance(authenticate, Authenticator) else None
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.hooks = hooks if hooks is not None else []
        self.notifier = notifier or Notifier(None)
        self.status = "serving"          # STATUS= sent with READY=1 after a reload
        self.cert_pair = self._pair(args) if ssl_context is not None else None
        self._cert_print = self._print(self.cert_pair)

    def _pair(self, args: argparse.Namespace) -> tuple[Path, Path | None]:
        """The certificate and key files HTTPS uses with these options."""
        cert = getattr(args, "cert", None)
        if cert is not None:
            key = getattr(args, "key", None)
            return Path(cert), Path(key) if key is not None else None
        if self.state_dir is None:
            raise ReloadError("HTTPS without --cert needs a state directory")
        return self.state_dir / "tls" / CERT_NAME, self.state_dir / "tls" / KEY_NAME

    @staticmethod
    def _print(pair: tuple[Path, Path | None] | None) -> str | None:
        if pair is None:
            return None
        try:
            return _fingerprint(pair[0])
        except OSError:
            return None

    def reload(self) -> bool:
        """One SIGHUP; True if the new settings were applied."""
        self.notifier.reloading()
        status = self.status
        fds: list[int] = []
        try:
            self._apply(self._read(fds))
        except ReloadError as exc:
            log.error("reload failed, keeping the current settings: %s", exc)
            status = f"{self.status}; last reload failed: {exc}"[:400]
        except Exception as exc:     # a reload must never stop the server
            log.exception("reload failed, keeping the current settings")
            status = f"{self.status}; last reload failed: {exc!r}"[:400]
        finally:
            for fd in fds:
                os.close(fd)
        for hook in list(self.hooks):
            try:
                hook()
            except Exception:
                log.exception("reload hook %r failed", hook)
        self.notifier.ready(status)
        return status == self.status

    def _read(self, fds: list[int]) -> dict:
        """Everything the new options need, loaded and checked; ReloadError if not.
        File descriptors to close afterwards are added to `fds`."""
        reread = getattr(self.args, "reread_config", None)
        try:
            new = reread() if reread is not None else self.args
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        plan: dict = {"new": new}
        auth = self.authenticate
        if auth is not None and auth.users is not None and getattr(new, "users", None) is not None:
            try:
                plan["users"] = UsersFile(Path(new.users))
            except (OSError, UsersFileError, ValueError) as exc:    # ValueError: bad UTF-8
                raise ReloadError(f"users file: {exc}") from None
        if self.ssl_context is not None:
            pair = self._pair(new)
            try:
                # The bytes are read once, into memory: what is checked here is exactly
                # what _apply loads, even if the files change in between.
                copies = (_in_memory(pair[0], fds),
                          _in_memory(pair[1], fds) if pair[1] is not None else None)
                server_context(*copies)         # a throw-away context: does the pair load?
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ReloadError(f"TLS certificate {pair[0]} / key {pair[1] or pair[0]}: "
                                  f"{exc}") from None
            plan["tls"] = pair
            plan["tls_copies"] = copies
        return plan

    def _apply(self, plan: dict) -> None:
        new = plan["new"]
        old = self.args
        applied = []
        level = getattr(new, "log_level", None)
        if level is not None:
            before = logsetup.set_level(level)
            applied.append(f"log level {level}" + ("" if before == level else f" (was {before})"))
        auth = self.authenticate
        if "users" in plan and auth is not None:
            auth.users = plan["users"]
            applied.append(f"users file {new.users} ({len(plan['users'].users)} users)")
        if auth is not None:
            auth.brake.burst = getattr(new, "login_burst", auth.brake.burst)
            auth.brake.refill = getattr(new, "login_refill", auth.brake.refill)
            auth.pam_role = getattr(new, "pam_role", auth.pam_role)
        if "tls" in plan and self.ssl_context is not None:
            cert, _key = plan["tls"]
            cert_copy, key_copy = plan["tls_copies"]
            # The same context object: the listeners hold it, and every new handshake
            # takes the certificate it has at that moment.
            self.ssl_context.load_cert_chain(cert_copy, key_copy)
            fp = self._print(plan["tls"])
            applied.append(f"TLS certificate {cert} "
                           + ("(unchanged)" if fp == self._cert_print else "(new)"))
            self.cert_pair, self._cert_print = plan["tls"], fp
        # What needs a restart: changed options outside LIVE, and switching
        # authentication on or off (a users file when there was none, or the reverse).
        changed = changed_options(old, new)
        restart = [k for k in changed if k not in LIVE or (k == "users" and "users" not in plan)]
        for dest in LIVE:
            if hasattr(new, dest) and not (dest == "users" and "users" not in plan):
                setattr(old, dest, getattr(new, dest))
        log.info("reloaded%s: %s", f" {new.config}" if getattr(new, "config", None) else "",
                 "; ".join(applied))
        if restart:
            log.warning("changed but applied only on restart: %s",
                        ", ".join(option_name(k) for k in sorted(restart)))
        log.debug("reload done")
