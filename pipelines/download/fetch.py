"""HTTP fetching with an overall deadline per sample (a drip is cut off as a timeout), to public addresses only."""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from img2dataset.downloader import is_disallowed

from pipelines.download.guard import BLOCKED, AddressGuard, BlockedAddress, scheme_refusal

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
OPT_OUT = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's message: the catalog's `opt_out`
MAX_BYTES = 128 << 20  # a larger answer is refused (an endless stream would fill the memory before the deadline)
TOO_MANY_BYTES = "response too large"  # the catalog's `too_large`
PIECE = 1 << 20  # read size of an answer of unannounced length


def deadline_message(deadline: float) -> str:
    """The error of a sample cut off at its deadline (`timed out`: the catalog's retryable `timeout`)."""
    return f"timed out: no complete answer within the download deadline of {deadline:g} s"


class Ticket:
    """One sample's deadline and the socket it is reading from (set once connected)."""

    __slots__ = ("due", "expired", "sock")

    def __init__(self, due: float) -> None:
        self.due = due
        self.sock: socket.socket | None = None
        self.expired = False


class Watchdog:
    """One thread per process that shuts the socket of every sample still reading at its deadline.

    Shutting a socket down wakes the thread blocked on it (the read returns what came, or fails), so a drip
    never holds a download thread past its deadline, whatever the per-read timeout.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets: set[Ticket] = set()
        self._pid: int | None = None
        self._wakes_at = math.inf  # when the watch thread looks next: a later ticket needs no wake-up

    def arm(self, seconds: float) -> Ticket:
        """A ticket that expires `seconds` from now."""
        ticket = Ticket(time.monotonic() + seconds)
        with self._cond:
            if self._pid != os.getpid():  # first use in this process (workers are spawned, Ray reuses them)
                self._pid = os.getpid()
                threading.Thread(target=self._watch, name="download-deadlines", daemon=True).start()
            self._tickets.add(ticket)
            if ticket.due < self._wakes_at:
                self._cond.notify()
        return ticket

    def attach(self, ticket: Ticket, sock: socket.socket) -> None:
        """The socket the ticket's sample now reads from (a redirect connects again)."""
        with self._cond:
            ticket.sock = sock
            if ticket.expired:
                _shut(sock)

    def disarm(self, ticket: Ticket) -> None:
        """The sample is done, in time or not."""
        with self._cond:
            self._tickets.discard(ticket)

    def _watch(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ticket in [t for t in self._tickets if t.due <= now]:
                    ticket.expired = True
                    self._tickets.discard(ticket)
                    if ticket.sock is not None:
                        _shut(ticket.sock)
                self._wakes_at = min((t.due for t in self._tickets), default=math.inf) + 0.005
                self._cond.wait(None if self._wakes_at == math.inf else self._wakes_at - now)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for TLS: the blocked reader sees the end of the stream. An OSError means
    # the socket is closed already: the sample finished.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


WATCHDOG = Watchdog()
_current = threading.local()


def _watched(sock: socket.socket) -> None:
    ticket = getattr(_current, "ticket", None)
    if ticket is not None:
        WATCHDOG.attach(ticket, sock)


class _Guarded:
    """An http.client connection whose socket goes through the guard: resolved, checked, connected to the IP.

    The host name stays the connection's `host`, so the Host header and the TLS server name (SNI) are the URL's.
    """

    sock: socket.socket

    def __init__(self, host: str, *, guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._create_connection = guard.connect

    def connect(self) -> None:
        super().connect()  # for TLS, the handshake is bounded by the per-read timeout only
        _watched(self.sock)


class _Connection(_Guarded, http.client.HTTPConnection):
    pass


class _TLSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: AddressGuard) -> None:
        super().__init__()
        self.guard = guard

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_Connection, guard=self.guard), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: AddressGuard) -> None:
        super().__init__()
        self.guard = guard

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_TLSConnection, guard=self.guard), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https URLs only (urllib's own would follow one to ftp:)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        refusal = scheme_refusal(newurl)
        if refusal is not None:
            fp.close()
            raise BlockedAddress(f"{refusal}, redirected to by {req.full_url[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@functools.lru_cache(maxsize=8)
def _opener(allow: bool | tuple[str, ...]) -> urllib.request.OpenerDirector:
    """urllib's default opener with guarded connections, and without its ftp:, file: and data: handlers."""
    guard = AddressGuard.of(allow)
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTPHandler(guard),
        _HTTPSHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _attempt(
    url: str,
    timeout: float,
    token: str | None,
    disallowed: set[str] | None,
    max_bytes: int,
    opener: urllib.request.OpenerDirector,
) -> tuple[bytes | None, str]:
    refusal = scheme_refusal(url)
    if refusal is not None:
        return None, refusal
    agent = USER_AGENT + (f" (compatible; {token})" if token else "")
    request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
    try:
        with opener.open(request, timeout=timeout) as response:
            if disallowed and is_disallowed(response.headers, token, disallowed):
                return None, OPT_OUT
            if response.length is not None:  # announced: one read, as before
                if response.length > max_bytes:
                    return None, f"{TOO_MANY_BYTES}: {response.length} bytes announced"
                return response.read(), ""
            data = bytearray()  # chunked or until the server closes: read in pieces, up to the limit
            while len(data) <= max_bytes:
                piece = response.read(PIECE)
                if not piece:
                    return bytes(data), ""
                data += piece
            return None, f"{TOO_MANY_BYTES}: over {max_bytes} bytes"
    except urllib.error.URLError as err:  # urllib wraps what the connection raised: a refusal keeps its own words
        return None, str(err.reason if isinstance(err.reason, BlockedAddress) else err)
    except Exception as err:  # every failure of one sample is its error message, as in img2dataset
        return None, str(err)


def fetch(
    row: tuple[int, str],
    timeout: float,
    retries: int,
    user_agent_token: str | None,
    disallowed_header_directives: set[str] | None,
    deadline: float,
    max_bytes: int = MAX_BYTES,
    allow_private_addresses: bool | Sequence[str] = False,
) -> tuple[int, io.BytesIO | None, str | None]:
    """Download one image: img2dataset's `download_image_with_retry`, with every attempt inside one deadline.

    Args:
        row: (key, url).
        timeout: seconds per connect and per read, as before.
        retries: attempts after the first.
        user_agent_token: img2dataset's token for the user agent and the X-Robots-Tag check.
        disallowed_header_directives: X-Robots-Tag directives that refuse the image.
        deadline: seconds from the first attempt's start to the last byte, retries included.
        max_bytes: a longer answer is refused.
        allow_private_addresses: True, or the non-public networks (CIDR) that may be connected to; by default only
            public addresses are (every connection checked, redirects included; a refusal starts with BLOCKED).

    Returns:
        (key, the bytes, None), or (key, None, the error message).
    """
    key, url = row
    allow = allow_private_addresses
    opener = _opener(allow if isinstance(allow, bool) else tuple(allow))
    ticket = WATCHDOG.arm(deadline)
    _current.ticket = ticket
    error = ""
    try:
        for _ in range(retries + 1):
            left = ticket.due - time.monotonic()
            if left <= 0:
                break
            data, error = _attempt(
                url, min(timeout, left), user_agent_token, disallowed_header_directives, max_bytes, opener
            )
            if ticket.expired or error.startswith(BLOCKED):  # cut off (whatever came is incomplete), or refused
                break
            if data is not None:
                return key, io.BytesIO(data), None
    finally:
        _current.ticket = None
        WATCHDOG.disarm(ticket)
    return key, None, deadline_message(deadline) if ticket.expired or not error else error
