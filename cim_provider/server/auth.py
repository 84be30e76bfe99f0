"""Who may talk to the server: HTTP Basic credentials, checked against a users file
(scrypt hashes) or PAM, with roles and a per-address brake on failed logins.

DSP0200, Security Considerations: a CIM server may require HTTP authentication; a
request without acceptable credentials is answered with 401 Unauthorized and a
WWW-Authenticate challenge (RFC 7617 Basic here, sent preemptively by pywbem and
wbemcli). Basic sends the password in clear, so anywhere but loopback it is only
offered over HTTPS (see server.py).

Users file: one `name:role:scrypt$N$r$p$salt$hash` line per user (base64 salt and
hash), never readable by group or others. It is re-read when it changes, so
`cim-provider passwd` takes effect without a restart.

Failed logins are counted per client address in a token bucket: `burst` failures at
once, then one more every `refill` seconds. An address with an empty bucket gets 429
Too Many Requests (with Retry-After) for every request carrying credentials, right or
wrong, without the password being checked: a blocked attacker learns nothing, and
cannot make the server spend scrypt time.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web

from ..wbem.dispatch import OperationContext

log = logging.getLogger(__name__)

ROLES = ("reader", "operator")
REALM = "cimom"
# scrypt N=2^14, r=8, p=1: 16 MiB and tens of ms per check (the usual interactive cost).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_MAXMEM = 64 * 1024 * 1024


class UsersFileError(Exception):
    """The users file is unusable (permissions, syntax); the message says why."""


# --- hashing ----------------------------------------------------------------------------

def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash in the users-file notation."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                            maxmem=_MAXMEM, dklen=32)
    return "scrypt${}${}${}${}${}".format(n, r, p, base64.b64encode(salt).decode(),
                                          base64.b64encode(digest).decode())


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches `encoded`; the final comparison is constant-time."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        n_, r_, p_ = int(n), int(r), int(p)
        if n_ > 1 << 20 or r_ > 32 or p_ > 16:     # a hostile file must not exhaust us
            return False
        want = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt, validate=True),
                             n=n_, r=r_, p=p_, maxmem=_MAXMEM, dklen=len(want))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, want)


_DUMMY: list[str] = []
_DUMMY_LOCK = threading.Lock()


def _dummy_hash() -> str:
    """A hash to check unknown user names against, so they cost as much as known ones.
    Made on the first unknown name, not at import: scrypt's tens of milliseconds are
    not part of every start-up (issue 16, start-up; docs/architecture.md, "Data flow":
    server/auth.py checks the users). Verification runs in worker threads: the lock
    makes it once."""
    if not _DUMMY:
        with _DUMMY_LOCK:
            if not _DUMMY:
                _DUMMY.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY[0]


# --- the users file ---------------------------------------------------------------------

@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str


def check_private(path: Path) -> os.stat_result:
    """The file's stat; UsersFileError if group or others may read or write it."""
    st = path.stat()
    if st.st_mode & 0o077:
        raise UsersFileError(f"{path} is accessible by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    return st


def valid_name(name: str) -> bool:
    return bool(name) and len(name) <= 256 and name.isprintable() \
        and not any(c in name for c in ": \t")


def parse_users(text: str, where: str = "users file") -> dict[str, User]:
    users: dict[str, User] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or not valid_name(parts[0]) or parts[1] not in ROLES \
                or not parts[2].startswith("scrypt$"):
            raise UsersFileError(f"{where}, line {lineno}: expected NAME:ROLE:scrypt$...")
        users[parts[0]] = User(parts[0], parts[1], parts[2])
    return users


def format_users(users: dict[str, User]) -> str:
    return "".join(f"{u.name}:{u.role}:{u.hash}\n" for u in users.values())


def load_users(path: Path) -> dict[str, User]:
    check_private(path)
    return parse_users(path.read_text(encoding="utf-8"), str(path))


class UsersFile:
    """The users file, re-read (at most once a second) when its mtime or size changes.
    A file that becomes unreadable, public or unparsable (half written, say) keeps the
    last good contents, loudly.

    Looked up from the loop and from the password-check threads at once: one lock
    covers the re-read, and the users and the file signature they were read at are
    replaced together under it, so two re-reads can never interleave (an older file
    read slowly must not replace a newer one). A lookup that finds a re-read under way
    elsewhere does not wait for it: it answers from the users read so far."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        st = check_private(self.path)
        self.users = load_users(self.path)
        self._sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._checked = time.monotonic()

    def get(self, name: str) -> User | None:
        if time.monotonic() - self._checked >= 1.0 and self._lock.acquire(blocking=False):
            try:
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self.users.get(name)

    def _reload_if_changed(self) -> None:
        """Under the lock: re-read the file if its signature changed."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return                      # re-checked by another caller just now
        self._checked = now
        try:
            st = self.path.stat()
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig != self._sig:
                users = load_users(self.path)
                self.users, self._sig = users, sig
                log.info("re-read %s: %d users", self.path, len(users))
        except (OSError, UsersFileError, ValueError) as exc:   # ValueError: bad UTF-8
            log.error("keeping the previous users: %s", exc)


# --- PAM --------------------------------------------------------------------------------

def pam_checker(service: str) -> Callable[[str, str], bool]:
    """A blocking (user, password) -> bool through PAM service `service`.

    Needs the python-pam package; without it this raises RuntimeError at start-up."""
    try:
        import pam
    except ImportError:
        raise RuntimeError("--pam-service needs the python-pam package "
                           "(pip install python-pam), which is not installed") from None

    def check(user: str, password: str) -> bool:
        return bool(pam.pam().authenticate(user, password, service=service))
    return check


# --- rate limiting ----------------------------------------------------------------------

class FailureBrake:
    """Token bucket of failed logins per address; bounded in memory (LRU of addresses)."""

    def __init__(self, burst: int = 5, refill: float = 2.0, max_addresses: int = 10000,
                 clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.refill = refill
        self.max_addresses = max_addresses
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, addr: str, now: float) -> float:
        tokens, at = self._buckets.get(addr, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.refill)

    def _set(self, addr: str, level: float, now: float) -> None:
        self._buckets[addr] = (min(max(level, 0.0), float(self.burst)), now)
        self._buckets.move_to_end(addr)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def retry_after(self, addr: str) -> int:
        """0 when `addr` may try; otherwise seconds until it may."""
        if addr not in self._buckets:
            return 0
        level = self._level(addr, self.clock())
        if level >= 1.0:
            return 0
        return max(1, int((1.0 - level) * self.refill + 0.999))

    def take(self, addr: str) -> bool:
        """Charge one attempt to `addr` *before* checking a password; False (nothing
        charged) when its bucket is empty.  Taking before the (slow, awaited) check is what
        keeps concurrent attempts from all passing a check-then-charge brake."""
        now = self.clock()
        level = self._level(addr, now)
        if level < 1.0:
            return False
        self._set(addr, level - 1.0, now)
        return True

    def refund(self, addr: str) -> None:
        """Give back the token of an attempt that succeeded."""
        if addr in self._buckets:
            now = self.clock()
            self._set(addr, self._level(addr, now) + 1.0, now)


# --- the authenticate hook for make_app -------------------------------------------------

def parse_basic(header: str | None) -> tuple[str, str] | None:
    """RFC 7617: `Basic base64(user:password)`; None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token or len(token) > 4096:
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep or not user:
        return None
    return user, password


class Authenticator:
    """`await auth(request, ctx)` -> None (ctx filled in) or the response to send.

    Verified credentials are remembered (as an HMAC under a per-process key, never the
    password) for `cache_ttl` seconds, so a client sending Basic with every request
    pays scrypt once, not per request."""

    def __init__(self, users: UsersFile | None = None,
                 pam: Callable[[str, str], bool] | None = None, pam_role: str = "reader",
                 brake: FailureBrake | None = None, cache_ttl: float = 300.0,
                 max_parallel: int = 2):
        if users is None and pam is None:
            raise ValueError("an Authenticator needs a users file or PAM")
        self.users = users
        self.pam = pam
        self.pam_role = pam_role
        self.brake = brake or FailureBrake()
        self.cache_ttl = cache_ttl
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[str, tuple[bytes, str, str | None, float]] = OrderedDict()
        self._slots = asyncio.Semaphore(max_parallel)   # scrypt/PAM memory and CPU bound
        self.failures = 0

    @staticmethod
    def challenge(text: str = "authentication required\n") -> web.Response:
        return web.Response(status=401, text=text,
                            headers={"WWW-Authenticate": f'Basic realm="{REALM}"'})

    def _braked(self, addr: str) -> web.Response:
        return web.Response(status=429, text="too many failed logins; try again later\n",
                            headers={"Retry-After": str(max(1, self.brake.retry_after(addr)))})

    def _mac(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def _file_hash(self, user: str) -> str | None:
        entry = self.users.get(user) if self.users is not None else None
        return None if entry is None else entry.role + ":" + entry.hash

    def _cached_role(self, user: str, password: str) -> str | None:
        hit = self._cache.get(user)
        if hit is None:
            return None
        mac, role, source, expires = hit
        if time.monotonic() > expires or source != self._file_hash(user) \
                or not hmac.compare_digest(mac, self._mac(user, password)):
            return None      # expired, or the file changed this user: check again
        return role

    def _verify(self, user: str, password: str) -> str | None:
        """Blocking: the role of a valid user, else None."""
        entry = self.users.get(user) if self.users is not None else None
        if entry is not None:
            return entry.role if verify_password(password, entry.hash) else None
        if self.pam is not None:
            try:
                return self.pam_role if self.pam(user, password) else None
            except Exception as exc:       # a broken PAM stack is a failed login, logged
                log.error("PAM error for %r: %s", user[:64], exc)
                return None
        verify_password(password, _dummy_hash())   # unknown users cost the same
        return None

    async def __call__(self, request: web.Request, ctx: OperationContext) -> web.Response | None:
        addr = request.remote or "unknown"
        creds = parse_basic(request.headers.get("Authorization"))
        if creds is None:
            return self.challenge()
        if self.brake.retry_after(addr):
            return self._braked(addr)
        user, password = creds
        role = self._cached_role(user, password)
        if role is None:
            # The token is taken before the slow check (no await in between), so N
            # concurrent attempts from one address cannot all pass an empty-looking
            # bucket: at most `burst` of them reach the password check.
            if not self.brake.take(addr):
                return self._braked(addr)
            try:
                async with self._slots:
                    role = await asyncio.get_running_loop().run_in_executor(
                        None, self._verify, user, password)
            except BaseException:
                self.brake.refund(addr)    # not a failed login: cancelled or broken
                raise
            if role is None:
                self.failures += 1
                log.warning("failed login for %r from %s", user[:64], addr)
                return self.challenge("wrong user name or password\n")
            self.brake.refund(addr)
            self._cache[user] = (self._mac(user, password), role, self._file_hash(user),
                                 time.monotonic() + self.cache_ttl)
            self._cache.move_to_end(user)
            while len(self._cache) > 1000:
                self._cache.popitem(last=False)
        ctx.user = user
        ctx.role = role
        # Pull contexts belong to the user at that address (pull.py checks the owner).
        ctx.client = f"{user}@{addr}"
        return None
