"""The HTTP + WebSocket app of ``flashdreams-serve``: ``/`` (web page), ``/status``, ``/ws``, and
``/v1/realtime/video`` (vLLM-Omni's realtime video protocol, ``realtime.py``).

The app talks to a *backend*: ``LocalBackend`` (the model in this process, ``engine.py``) or
``ray_backend.RayBackend`` (generator replicas on Ray Serve). A backend hands out one *channel*
per client (``hello()``, ``handle(raw)``, ``end(reason)``; ``Stream`` is the local one) and
answers ``status()``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from pathlib import Path

from omegaconf import DictConfig
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from flashdreams import ConfigError
from flashdreams.serve import protocol
from flashdreams.serve.config import check_serve
from flashdreams.serve.engine import Engine
from flashdreams.serve.limits import (
    OVERSIZE,
    OVERSIZE_BINARY,
    Guard,
    MessageRate,
    size_limited_protocol,
)
from flashdreams.serve.stream import Stream

log = logging.getLogger("flashdreams.serve")
STATIC = Path(__file__).parent / "static"
_DROPPED_OFFSET = protocol.FRAME_HEADER.size - 8  # the header's `dropped` field
MAX_PENDING_REPLIES = 256  # unread JSON replies before a client is cut off


class OutQueue:
    """Outgoing messages of one client; frames beyond ``max_frames`` drop the oldest frame.

    JSON replies are never dropped (a client that does not read them is disconnected once
    ``MAX_PENDING_REPLIES`` pile up). Used on the event loop only.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max(1, max_frames)
        self.items: deque[tuple[str | bytes, bool]] = deque()
        self.num_droppable = 0
        self.dropped = 0  # frames dropped so far
        self.closed = False  # the send loop ended (the client went away)
        self._ready = asyncio.Event()
        self._taken = asyncio.Event()  # set when a message leaves (or the send loop ends)

    def put(self, item: str | bytes, droppable: bool) -> None:
        """Queue a message (``droppable``: a frame or per-step info)."""
        self.items.append((item, droppable))
        self.num_droppable += droppable
        while self.num_droppable > self.max_frames:
            for i, (old, can_drop) in enumerate(self.items):
                if can_drop:
                    del self.items[i]
                    self.num_droppable -= 1
                    self.dropped += isinstance(old, bytes)
                    break
        self._ready.set()

    @property
    def pending_replies(self) -> int:
        """Queued messages that cannot be dropped."""
        return len(self.items) - self.num_droppable

    async def replies_below(self, limit: int, timeout: float) -> bool:
        """Wait until fewer than ``limit`` replies are queued; False when the client has not
        read them within ``timeout`` seconds or is gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending_replies >= limit:
            if self.closed or loop.time() >= deadline:
                return False
            self._taken.clear()
            try:
                await asyncio.wait_for(self._taken.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                return False
        return True

    async def get(self) -> str | bytes:
        """Next message, oldest first."""
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        item, droppable = self.items.popleft()
        self._taken.set()
        self.num_droppable -= droppable
        if isinstance(item, bytes) and item[:4] == protocol.FRAME_MAGIC:  # drops at send time
            item = bytearray(item)
            protocol.FRAME_HEADER_DROPPED.pack_into(item, _DROPPED_OFFSET, self.dropped)
            item = bytes(item)
        return item


# what a send or close to a client that went away raises (uvicorn: ClientDisconnected, an OSError)
_GONE = (WebSocketDisconnect, RuntimeError, OSError)


async def _send_loop(ws: WebSocket, out: OutQueue) -> None:
    try:
        while True:
            item = await out.get()
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_text(item)
    except _GONE:
        pass  # the client went away; the receive loop sees the disconnect and ends the stream
    finally:
        out.closed = True
        out._taken.set()


FLOOD_CLOSE = 1008  # close code (policy violation) of a client that keeps flooding
REPLY_WAIT_S = 10.0  # a flooding client that reads none of its errors this long is cut off


def message_rate(serve_cfg) -> MessageRate:
    """A connection's message-rate limit (``serve.max_messages_per_s``, ``message_burst``)."""
    return MessageRate(serve_cfg.max_messages_per_s, serve_cfg.message_burst)


async def refuse_over_rate(out: OutQueue, rate: MessageRate, reply: str) -> dict | None:
    """A message over the rate (dropped unread): queue its one ``error`` ``reply``.

    Refusing is cheaper than sending the error, so a flood would pile errors up: past half of
    ``MAX_PENDING_REPLIES`` queued replies this waits until the client reads them (the flood is
    slowed to the client's reading pace, memory stays bounded). Returns the close (``code``,
    ``reason``) of a client to disconnect: it keeps flooding far past the rate
    (``rate.flooding``), or has read none of its replies for ``REPLY_WAIT_S``; else None.
    """
    limit = f"serve.max_messages_per_s={rate.per_s:g}"
    if rate.flooding:
        return {"code": FLOOD_CLOSE, "reason": f"flooding: far past {limit}"}
    if not await out.replies_below(MAX_PENDING_REPLIES // 2, REPLY_WAIT_S):
        return {"code": FLOOD_CLOSE, "reason": f"flooding past {limit}, replies unread"}
    out.put(reply, droppable=False)
    return None


def _client(ws: WebSocket) -> str:
    return f"{ws.client.host}:{ws.client.port}" if ws.client else "client"


class LocalBackend:
    """The model in this process: one ``Engine``, a ``Stream`` per client."""

    def __init__(self, cfg: DictConfig, engine: Engine) -> None:
        self.cfg, self.engine = cfg, engine

    def channel(self, out, raw_frames: bool = False) -> Stream:
        return Stream(self.engine, self.cfg, out, raw_frames=raw_frames)

    async def status(self) -> dict:
        return {"backend": "local", **self.engine.status()}

    def shutdown(self) -> None:
        self.engine.shutdown()


async def websocket_endpoint(ws: WebSocket) -> None:
    """One client: a receive loop here, a send loop, and at most one generating stream."""
    cfg: DictConfig = ws.app.state.cfg
    await ws.accept()
    out = OutQueue(cfg.serve.queue_frames)
    stream = ws.app.state.backend.channel(out)
    sender = asyncio.create_task(_send_loop(ws, out))
    out.put(protocol.event("hello", **stream.hello()), droppable=False)
    closed_by_client, close = False, {}
    rate = message_rate(cfg.serve)
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                closed_by_client = True
                if msg.get("code", 1000) not in (1000, 1001):
                    log.info("%s disconnected (code %s)", _client(ws), msg.get("code"))
                break
            if not rate.admit():  # (on the ingress with serve.backend=ray too)
                reply = protocol.error("rate_limited", rate.refusal())
                close = await refuse_over_rate(out, rate, reply) or {}
                if close or sender.done():
                    log.warning("%s disconnected: %s (%d messages refused)", _client(ws),
                                close.get("reason", "gone"), rate.refused)  # fmt: skip
                    break
                continue
            if OVERSIZE in msg:
                raw = protocol.Oversize(msg[OVERSIZE], msg.get(OVERSIZE_BINARY, False))
            else:
                raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
            await stream.handle(raw)
            if out.pending_replies > MAX_PENDING_REPLIES or sender.done():
                break
    finally:
        await stream.end("disconnect")
        sender.cancel()
        if not closed_by_client:
            try:
                await ws.close(**close)
            except _GONE:
                pass  # the client is gone already


async def index(request) -> FileResponse:
    return FileResponse(STATIC / "index.html")


async def status(request) -> JSONResponse:
    return JSONResponse(await request.app.state.backend.status())


def create_app(cfg: DictConfig, engine: Engine | None = None, backend=None) -> Starlette:
    """The Starlette app behind the Host / Origin guard; with neither ``engine`` nor
    ``backend`` given, the local engine (model weights) is built here."""
    from flashdreams.serve.realtime import realtime_endpoint

    check_serve(cfg.serve)
    s = cfg.serve
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/status", status),
            WebSocketRoute("/ws", websocket_endpoint),
            WebSocketRoute("/v1/realtime/video", realtime_endpoint),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
    app.state.cfg = cfg
    if backend is None:
        app.state.engine = engine or Engine(cfg)
        backend = LocalBackend(cfg, app.state.engine)
    app.state.backend = backend
    guarded = Guard(app, s.host, s.allowed_hosts, s.allowed_origins)
    guarded.state = app.state
    return guarded


def bind_socket(host: str, port: int, send_buffer_bytes: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: a free port); ``ConfigError`` when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes > 0:  # inherited by accepted connections
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ConfigError(f"serve.port={port}: cannot listen on {host}:{port} "
                          f"({err.strerror or err}); pick another serve.port (0: any free one)"
                          ) from None  # fmt: skip
    sock.setblocking(False)
    return sock


def uvicorn_config(app, serve_cfg):
    """uvicorn's settings: oversize messages dropped unread (``limits``), no compression.
    Binary messages may reach ``serve.max_frame_bytes`` when the recipe's control takes
    streamed frames (HDMap), else ``serve.max_message_bytes`` as text."""
    import uvicorn

    takes_frames = app.state.engine.shared.conditioning.control.frames_ahead() > 0
    binary = serve_cfg.max_frame_bytes if takes_frames else serve_cfg.max_message_bytes
    biggest = max(serve_cfg.max_message_bytes, binary)
    return uvicorn.Config(
        app, log_config=None, log_level="warning", ws=size_limited_protocol(
            serve_cfg.max_message_bytes, binary), ws_max_size=max(biggest * 4, 2**20),
        ws_per_message_deflate=False, lifespan="off",
    )  # fmt: skip


def serve(cfg: DictConfig) -> None:
    """Bind (a port in use fails here, before any loading), load the recipe, serve."""
    import uvicorn

    s = cfg.serve
    check_serve(s)
    if s.backend == "ray":
        from flashdreams.serve.ray_backend import serve_ray

        serve_ray(cfg)
        return
    sock = bind_socket(s.host, s.port, s.send_buffer_bytes)
    try:
        app = create_app(cfg)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    config = uvicorn_config(app, s)
    server = uvicorn.Server(config)
    url = f"http://{s.host}:{port}/"
    print(f"flashdreams-serve: listening on {url} (recipe {cfg.run_name}, "
          f"max_sessions={s.max_sessions})", flush=True)  # fmt: skip
    if s.port_file:
        Path(s.port_file).write_text(str(port))
    try:
        server.run(sockets=[sock])
    finally:
        app.state.backend.shutdown()
