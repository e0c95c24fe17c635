"""What reaches the app from a client: the Host / Origin allow-list and the message size limit.

``Guard`` is an ASGI middleware that refuses (HTTP 403, before any WebSocket upgrade) a request
whose ``Host`` is not one of the server's names, or a WebSocket handshake whose ``Origin`` is
another site's: a page from elsewhere, or a DNS-rebinding page, cannot drive the server.

``MessageRate`` is one connection's message-rate limit (``serve.max_messages_per_s``, a token
bucket of ``serve.message_burst``).

``size_limited_protocol`` returns uvicorn's WebSocket protocol with a frame filter in front of
its parser: the payload of a message past ``max_bytes`` is read and dropped as it arrives (the
parser sees an empty frame in its place), and the app receives an ``OVERSIZE`` marker instead
of the message, so an oversize message of any size gets an ``error`` and the stream goes on,
with memory bounded by the limit, not the message.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from urllib.parse import urlsplit

from starlette.responses import PlainTextResponse

log = logging.getLogger("flashdreams.serve")
LOOPBACK = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")
OVERSIZE = "flashdreams.oversize"  # key of the marker message: the dropped message's size
OVERSIZE_BINARY = "flashdreams.oversize_binary"  # and whether it was a binary message
FLOOD_S = 10  # refusals beyond this many seconds' worth of messages disconnect the client


class MessageRate:
    """Per-connection token bucket over every client message (text, binary, oversize).

    A message takes a token; tokens refill at ``per_s`` up to ``burst``. A message without a
    token is refused (``admit`` is False: the caller sends one ``rate_limited`` error and drops
    it unprocessed). Refusals fill a second bucket of ``FLOOD_S`` seconds' worth of messages
    (``FLOOD_S * per_s``, at least ``burst``) that drains at ``per_s``: a client that keeps
    sending well past the rate (more than twice it, for long enough) overflows it and
    ``flooding`` turns True (the caller disconnects it). ``per_s <= 0`` disables the limit.
    """

    def __init__(self, per_s: float, burst: int, clock=time.monotonic) -> None:
        self.per_s, self.burst, self.clock = float(per_s), max(1, int(burst)), clock
        self.tokens = float(self.burst)
        self.strikes = 0.0  # refusals not yet drained
        self.max_strikes = max(FLOOD_S * self.per_s, self.burst)
        self.refused = 0
        self.t = clock()

    def admit(self) -> bool:
        """Take a token for one message; False: the message is over the rate."""
        if self.per_s <= 0:
            return True
        now = self.clock()
        refill, self.t = (now - self.t) * self.per_s, now
        self.tokens = min(float(self.burst), self.tokens + refill)
        self.strikes = max(0.0, self.strikes - refill)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.strikes += 1
        self.refused += 1
        return False

    @property
    def flooding(self) -> bool:
        """The client kept flooding far past the rate: disconnect it."""
        return self.strikes > self.max_strikes

    def refusal(self) -> str:
        """The one-line message of a ``rate_limited`` error."""
        return (f"message dropped: more than serve.max_messages_per_s={self.per_s:g} messages "
                f"per second (bursts of serve.message_burst={self.burst}) on this connection; "
                "send slower")  # fmt: skip


def host_name(host: str) -> str:
    """``Host`` header / netloc without its port, lower case (``[::1]:80`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: allow-list of ``Host`` names and of WebSocket ``Origin``s.

    Args:
        app: the wrapped ASGI app.
        bind_host: the interface the server binds (its name is allowed as a ``Host``).
        allowed_hosts: more ``Host`` names (``serve.allowed_hosts``); ``*`` allows any.
        allowed_origins: more origins, e.g. ``https://app.example:8443``
            (``serve.allowed_origins``); ``*`` allows any. Same-origin pages (``Origin`` equal to
            the request's ``Host``) and handshakes without ``Origin`` are always allowed.
    """

    def __init__(self, app, bind_host: str, allowed_hosts=(), allowed_origins=()) -> None:
        self.app = app
        names = {*LOOPBACK, *(host_name(h) for h in allowed_hosts)}
        if host_name(bind_host) not in ANY_ADDRESS:
            names.add(host_name(bind_host))
        self.hosts = names
        self.origins = {o.strip().lower().rstrip("/") for o in allowed_origins}

    def refusal(self, scope) -> str | None:
        """Why a request is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return f"Host {host!r} is not allowed (serve.allowed_hosts)"
        origin = headers.get("origin")
        if scope["type"] != "websocket" or origin is None or "*" in self.origins:
            return None
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins:
            return None
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc == host.strip().lower():
            return None  # the page this server served
        return f"Origin {origin!r} is not allowed (serve.allowed_origins)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        why = self.refusal(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s from %s: %s", scope["type"], client[0], why)
        if scope["type"] == "http":
            await PlainTextResponse(f"403 Forbidden: {why}\n", status_code=403)(
                scope, receive, send
            )
        else:  # a close before the accept is an HTTP 403 answer to the upgrade
            await send({"type": "websocket.close", "code": 1008})


def size_limited_protocol(max_bytes: int, max_binary_bytes: int | None = None):
    """uvicorn's WebSocket protocol class, dropping message payloads past ``max_bytes``
    (binary messages: past ``max_binary_bytes`` when given, e.g. HDMap frames)."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.protocol import State

    class SizeLimitedProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._header = bytearray()  # header bytes of the frame being read
            self._remaining = 0  # payload bytes of the current frame still to come
            self._dropping = False  # the current frame's payload is dropped
            self._message_size = 0  # data bytes of the current message so far
            self._oversize = False  # the current message is past the limit
            self._binary = False  # the current message is binary
            self._verdicts: deque[tuple[int, bool] | None] = deque()  # (size, binary) if dropped

        def data_received(self, data: bytes) -> None:
            if self.conn.state is not State.OPEN or self.conn.parser_exc is not None:
                super().data_received(data)
                return
            out, i, n = bytearray(), 0, len(data)
            while i < n:
                if self._remaining:
                    take = min(self._remaining, n - i)
                    if not self._dropping:
                        out += data[i : i + take]
                    i, self._remaining = i + take, self._remaining - take
                    continue
                need = self._header_size()
                take = min(need - len(self._header), n - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) == self._header_size():
                    out += self._frame_header()
            if out:
                super().data_received(bytes(out))

        def _header_size(self) -> int:
            if len(self._header) < 2:
                return 2
            size = 2 + {126: 2, 127: 8}.get(self._header[1] & 0x7F, 0)
            return size + 4 * bool(self._header[1] & 0x80)

        def _frame_header(self) -> bytes:
            """Decide on a complete frame header; returns the header the parser sees."""
            header, self._header = bytes(self._header), bytearray()
            fin, opcode, length = header[0] & 0x80, header[0] & 0x0F, header[1] & 0x7F
            if length >= 126:
                size = 2 if length == 126 else 8
                length = int.from_bytes(header[2 : 2 + size], "big")
            self._remaining, self._dropping = length, False
            if opcode >= 0x8:  # control frame: the parser checks it
                return header
            if opcode in (0x1, 0x2):  # a new text / binary message
                self._message_size, self._oversize, self._binary = 0, False, opcode == 0x2
            self._message_size += length
            limit = max_binary_bytes if self._binary and max_binary_bytes else max_bytes
            self._oversize = self._oversize or self._message_size > limit
            if fin:
                verdict = (self._message_size, self._binary) if self._oversize else None
                self._verdicts.append(verdict)
            if not self._oversize:
                return header
            self._dropping = True  # same frame, empty payload (masked with a zero key)
            return bytes([header[0], 0x80 | 0]) + b"\0\0\0\0"

        def send_receive_event_to_app(self) -> None:
            dropped = self._verdicts.popleft() if self._verdicts else None
            if dropped is None:
                super().send_receive_event_to_app()
                return
            self.frames = []
            if self.close_sent:
                return
            size, binary = dropped
            self.queue.put_nowait({"type": "websocket.receive", "text": None, OVERSIZE: size,
                                   OVERSIZE_BINARY: binary})  # fmt: skip
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    return SizeLimitedProtocol
