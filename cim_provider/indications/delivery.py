"""Indication delivery: CIM-XML export requests, one worker per listener destination.

Why one task and one bounded queue per destination: a listener that is slow, stalled
or gone must cost the server and the other listeners nothing. Publishing only appends
to a deque; each worker sends its own indications in order, one at a time.

Policy (per destination):
- queue of at most `queue_size` indications (default 1000); when full the *oldest*
  queued indication is dropped, so the listener still learns the latest state, and a
  warning is logged (first drop, then every 100th);
- each indication is tried up to `attempts` times (default 4) with exponential back-off
  (0.25 s, 0.5 s, 1 s, ... capped at `max_delay`, default 5 s); every attempt has a
  `timeout` (default 5 s) for connect + send + response;
- when all attempts fail, the indication is dropped with a warning and the destination
  is marked unreachable: further indications get a single attempt, after the capped
  back-off, until one succeeds (logged as "reachable again"), so a dead listener does
  not hold a backlog for minutes;
- an HTTP 4xx (other than 408/429) or a CIM ERROR in the export response is the
  listener refusing that indication: it is dropped at once (no retry).

HTTPS listeners (our choice): consoles usually listen with a self-signed certificate,
so by default a listener's certificate is *not* verified -- unless the destination
carries a username / password: credentials go only to a listener whose certificate
verifies against the system's trust store (SSL_CERT_FILE / SSL_CERT_DIR honoured).
`insecure_listeners=True` (the server's --insecure-listeners) sends them unverified
anyway, with a warning once per destination; `verify_tls=True` verifies every listener.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import re
import ssl
from collections import deque
from dataclasses import dataclass

import aiohttp
from pywbem import CIMInstance, CIMProperty, Sint64

from ..wbem import writer as w

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
ATTEMPTS = 4
BASE_DELAY = 0.25
MAX_DELAY = 5.0
TIMEOUT = 5.0
MAX_RESPONSE = 64 * 1024
_ERROR = re.compile(rb'<ERROR\s[^>]*CODE="(\d+)"[^>]*?(?:DESCRIPTION="([^"]*)")?', re.S)

# DSP0200 (CIM operations over HTTP), export requests: the CIMExport header says
# "MethodRequest", CIMExportMethod names the export method of EXPMETHODCALL.
EXPORT_HEADERS = {"Content-Type": 'application/xml; charset="utf-8"',
                  "CIMProtocolVersion": "1.0",
                  "CIMExport": "MethodRequest",
                  "CIMExportMethod": "ExportIndication"}


def listener_url(destination: str) -> str:
    """The URL of a CIM_ListenerDestination.Destination: DSP1054 lets the scheme be
    left out, and then it is http. The one place this is decided: validation, the
    worker and the check whether a destination's worker is still current use it."""
    return destination if "://" in destination else "http://" + destination


class Refused(Exception):
    """The listener answered and refused the indication: retrying will not help."""


@dataclass
class Stats:
    delivered: int = 0
    dropped: int = 0          # after retries, or refused
    overflowed: int = 0       # pushed out of a full queue


class DestinationWorker:
    """Delivers to one listener URL, in order, from a bounded queue."""

    def __init__(self, name: str, url: str, *, context: str, queue_size: int = QUEUE_SIZE,
                 attempts: int = ATTEMPTS, base_delay: float = BASE_DELAY,
                 max_delay: float = MAX_DELAY, timeout: float = TIMEOUT,
                 verify_tls: bool = False, insecure_listeners: bool = False,
                 auth: tuple[str, str] | None = None):
        # CIM_ListenerDestination.username / password: HTTP basic authentication
        # (RFC 7617: no ':' in the user-id). Checked first, so a bad one fails before any
        # task exists; the header is built once here.
        self.headers = dict(EXPORT_HEADERS)
        self.auth = auth or None
        if auth:
            if ":" in auth[0]:
                raise ValueError("a Basic user name may not contain ':'")
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode("utf-8")).decode("ascii")
            self.headers["Authorization"] = f"Basic {token}"
        self.name = name
        self.url = listener_url(url)
        self.context = context                 # SequenceContext (DSP1054 reliable delivery)
        self.queue_size = queue_size
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        # Credentials are not sent to an HTTPS listener nobody has verified (see above).
        self.verify_tls = verify_tls or (self.auth is not None and not insecure_listeners)
        if self.auth is not None and not self.verify_tls and \
                self.url.lower().startswith("https:"):
            log.warning("listener %s (%s): sending its username and password without "
                        "verifying its certificate (insecure listeners allowed)",
                        self.name, self.url)
        self.stats = Stats()
        self.unreachable = False
        self._queue: deque[CIMInstance] = deque()
        self._wake = asyncio.Event()
        self._seq = itertools.count(0)
        self._msg = itertools.count(1)
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"indications→{self.url}")

    def put(self, indication: CIMInstance) -> None:
        """Queue one indication (already a private copy); never blocks."""
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.stats.overflowed += 1
            if self.stats.overflowed % 100 == 1:
                log.warning("listener %s (%s): queue full (%d), dropped the oldest "
                            "indication (%d dropped so far)", self.name, self.url,
                            self.queue_size, self.stats.overflowed)
        # DSP1054 reliable indications: SequenceContext names this sender and destination,
        # SequenceNumber counts up from 0 in queueing order.
        indication["SequenceContext"] = CIMProperty("SequenceContext", self.context,
                                                    type="string")
        indication["SequenceNumber"] = CIMProperty("SequenceNumber", Sint64(next(self._seq)),
                                                   type="sint64")
        self._queue.append(indication)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # ---- the worker ------------------------------------------------------------------

    async def _run(self) -> None:
        ssl_arg: ssl.SSLContext | bool = ssl.create_default_context() if self.verify_tls \
            else False
        connector = aiohttp.TCPConnector(limit=1, ssl=ssl_arg)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         auto_decompress=False) as session:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                ind = self._queue.popleft()
                try:
                    await self._deliver(session, ind)
                except asyncio.CancelledError:
                    raise
                except Exception:       # a bug must not end delivery for good
                    log.exception("listener %s: delivery failed unexpectedly", self.name)

    async def _deliver(self, session: aiohttp.ClientSession, ind: CIMInstance) -> None:
        body = w.export_indication_xml(str(next(self._msg)), ind).encode("utf-8", "replace")
        tries = 1 if self.unreachable else self.attempts
        delay = self.max_delay if self.unreachable else self.base_delay
        reason = ""
        for attempt in range(tries):
            if attempt or self.unreachable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
            try:
                await self._post(session, body)
            except Refused as exc:
                self.stats.dropped += 1
                log.warning("listener %s (%s) refused indication %s: %s; dropped it",
                            self.name, self.url, ind.get("IndicationIdentifier"), exc)
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                    reason += ("; the listener's certificate is verified because the "
                               "destination has credentials" if self.auth is not None
                               else "")
                log.debug("listener %s attempt %d failed: %s", self.name, attempt + 1, reason)
                continue
            self.stats.delivered += 1
            if self.unreachable:
                self.unreachable = False
                log.warning("listener %s (%s) is reachable again (%d indication(s) dropped "
                            "while it was not)", self.name, self.url, self.stats.dropped)
            return
        self.stats.dropped += 1
        if not self.unreachable:
            self.unreachable = True
            log.warning("listener %s (%s) unreachable after %d attempt(s) (%s): dropped "
                        "indication %s; later ones get one attempt each until it answers",
                        self.name, self.url, tries, reason, ind.get("IndicationIdentifier"))
        else:
            log.info("listener %s still unreachable (%s): dropped indication %s",
                     self.name, reason, ind.get("IndicationIdentifier"))

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> None:
        async with session.post(self.url, data=body, headers=self.headers) as resp:
            data = await resp.content.read(MAX_RESPONSE)
            if resp.status in (408, 429) or resp.status >= 500:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                  message=resp.reason or "")
            if resp.status != 200:
                raise Refused(f"HTTP {resp.status} {resp.reason or ''} "
                              f"{resp.headers.get('CIMError', '')}".strip())
            m = _ERROR.search(data)
            if m is not None:
                desc = (m.group(2) or b"").decode("utf-8", "replace")
                raise Refused(f"CIM error {m.group(1).decode()} {desc}".strip())
