"""``serve.backend=ray``: the same app on Ray Serve, with generator replicas.

Two deployments: ``Ingress`` (one replica: the page, ``/status``, ``/ws``,
``/v1/realtime/video``, behind the same Host / Origin guard, reached through Ray Serve's HTTP
proxy on ``serve.host:serve.port``) and ``Generator`` (``serve.replicas`` replicas, one GPU
or ``serve.gpus_per_replica`` each; each loads the recipe once, ``Engine``, and runs up to
``serve.max_sessions`` streams). A client's stream runs inside one ``open`` call of a
generator replica, which streams its messages back (Ray Serve streaming responses); the
client's other messages reach the same replica as ``message`` calls, routed by
``ray_router.SessionRouter`` on the call's ``session_id``. A replica that dies fails its
``open`` calls: their clients get ``error`` then ``stopped`` with reason ``replica_lost``,
and Ray's controller starts a replacement (health checks, restarts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import statistics
import time
import uuid
from collections import deque
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig

from flashdreams.serve import protocol
from flashdreams.serve.app import OutQueue, bind_socket, create_app
from flashdreams.serve.protocol import ProtocolError
from flashdreams.serve.ray_router import ROUTING_STATS_PERIOD_S, replica_stats
from flashdreams.serve.stream import INTERNAL

log = logging.getLogger("flashdreams.serve")
APP_NAME = "flashdreams"
LOST = "the replica running this stream was lost (its process ended); start again"
_WAKE = ""  # wakes an open call's loop (never sent)
ROUTER = "flashdreams.serve.ray_router.SessionRouter"  # by name: one module, one /status


def _kind(item) -> str | None:
    """The ``type`` of a server JSON message (``protocol.event`` puts it first); None for a
    frame or ``_WAKE``."""
    return item[10 : item.index('"', 10)] if isinstance(item, str) and item else None


class Generator:
    """A generator replica: the model once (``Engine``), streams inside ``open`` calls."""

    def __init__(self, cfg: dict) -> None:
        from flashdreams.serve.engine import Engine

        self.cfg = OmegaConf.create(cfg)
        self.engine = Engine(self.cfg)
        self.streams: dict[str, object] = {}
        self.starting: dict[str, int] = {}
        self.step_ms: deque[float] = deque(maxlen=64)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def hello(self) -> dict:
        from flashdreams.serve.stream import Stream

        return Stream(self.engine, self.cfg, None).hello()

    async def open(self, sid: str, raw: str, raw_frames: bool = False):
        """Run one client's stream, from its ``start`` to its ``stopped``; yields its messages."""
        from flashdreams.serve.stream import Stream

        out = OutQueue(self.cfg.serve.queue_frames)
        stream = Stream(self.engine, self.cfg, out, raw_frames=raw_frames)
        self.streams[sid], self.starting[sid] = stream, 0
        live = False  # between a "started" and its "stopped"
        try:
            await stream.handle(raw)
            out.put(_WAKE, droppable=False)
            while True:
                item = await out.get()
                kind = _kind(item)
                if item != _WAKE:
                    if kind == "step":
                        self.step_ms.append(json.loads(item)["step_ms"])
                    live = kind == "started" or (live and kind != "stopped")
                    if kind == "started":  # which replica runs the stream (status, tests)
                        item = json.dumps({**json.loads(item), "replica": self.replica})
                    yield item
                if (
                    kind in (None, "stopped")
                    and not live
                    and not self.starting[sid]
                    and (stream.task is None and not out.items)
                ):  # the stream ended (or its start was refused) and no start is under way
                    return
        finally:
            self.streams.pop(sid, None)
            self.starting.pop(sid, None)
            await stream.end("disconnect")  # the client went away (the call was cancelled)

    async def message(self, sid: str, raw: str) -> str | None:
        """A client message of a running stream; returns an error to send, if any."""
        stream = self.streams.get(sid)
        if stream is None:
            return protocol.error("no_session", "no stream is running; send start")
        # (checked by the ingress; a binary control frame is never a start)
        start = isinstance(raw, str) and json.loads(raw).get("type") == "start"
        self.starting[sid] += start
        try:
            await stream.handle(raw)
        finally:
            self.starting[sid] -= start
            stream.out.put(_WAKE, droppable=False)
        return None

    async def close(self, sid: str) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            await stream.end("disconnect")

    def record_routing_stats(self) -> dict:
        """Per-replica stats: the router's free slots and ``/status``."""
        status = self.engine.status(collect=False)
        return {
            **status, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "sessions": list(self.streams), "replica": self.replica,
            "median_step_ms": statistics.median(self.step_ms) if self.step_ms else None,
        }  # fmt: skip


class RayChannel:
    """The ingress side of one client: parses and checks messages (the server's limits),
    opens streams on the replica with the most free slots and relays their messages."""

    def __init__(self, backend: RayBackend, out, raw_frames: bool = False) -> None:
        self.backend, self.out, self.raw_frames = backend, out, raw_frames
        self.cfg = backend.cfg
        self.relay: asyncio.Task | None = None
        self.sid = ""
        self.ready = asyncio.Event()

    def hello(self) -> dict:
        return self.backend.hello

    async def handle(self, raw) -> None:
        s = self.cfg.serve
        try:
            if protocol.check_control_frame(raw, self.backend.hello.get("control_frames") or 0,
                                            self.cfg.run_name, s.max_frame_bytes):  # fmt: skip
                if self.relay is None or self.relay.done():
                    raise ProtocolError("no_session", "control frame: no stream is running; "
                                        "send start")  # fmt: skip
                msg = None  # the replica's stream decodes it and applies the frame window
            else:
                msg = protocol.parse_message(raw, s.max_message_bytes, s.max_prompt_chars)
        except ProtocolError as err:
            self.out.put(protocol.error(err.code, str(err)), droppable=False)
            return
        if msg is not None and (self.relay is None or self.relay.done()):
            if msg["type"] != "start":
                self.out.put(protocol.error("no_session", f"{msg['type']}: no stream is "
                                            "running; send start"), droppable=False)  # fmt: skip
                return
            self.sid, self.ready = uuid.uuid4().hex, asyncio.Event()
            self.relay = asyncio.create_task(self._relay(self.sid, raw))
            return
        await self.ready.wait()  # the open is on its replica: route to it
        gen = self.backend.generator.options(session_id=self.sid, method_name="message")
        try:
            reply = await asyncio.wait_for(gen.remote(self.sid, raw), 30)
        except Exception:  # noqa: BLE001  (the relay reports a lost replica)
            return
        if reply:
            self.out.put(reply, droppable=False)

    async def _relay(self, sid: str, raw: str) -> None:
        gen = self.backend.generator.options(session_id=sid, method_name="open", stream=True)
        stopped = False
        try:
            async for item in gen.remote(sid, raw, self.raw_frames):
                self.ready.set()
                kind = _kind(item)
                if kind == "stopped":
                    msg = json.loads(item)
                    # the replica's queue and this one's drop frames (slow reader)
                    msg["dropped"] = (msg.get("dropped") or 0) + self.out.dropped
                    item, stopped = json.dumps(msg), True
                self.out.put(item, droppable=isinstance(item, bytes) or kind == "step")
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001  (tell the client; the server goes on)
            lost = isinstance(err, (RayActorError, ActorUnavailableError))
            if lost:
                log.warning("stream %s: replica lost (%s)", sid[:8], type(err).__name__)
            else:
                log.error("stream %s failed on its replica: %s", sid[:8], err)
            if not stopped:
                code, message = ("replica_lost", LOST) if lost else ("internal", INTERNAL)
                self.out.put(protocol.error(code, message), droppable=False)
                self.out.put(protocol.event("stopped", reason="replica_lost" if lost else "error",
                                            steps=None, frames=None, dropped=self.out.dropped),
                             droppable=False)  # fmt: skip
        finally:
            self.ready.set()

    async def end(self, reason: str) -> None:
        relay, self.relay = self.relay, None
        if relay is None or relay.done():
            return
        try:
            gen = self.backend.generator.options(session_id=self.sid, method_name="close")
            await asyncio.wait_for(gen.remote(self.sid), 10)
            await asyncio.wait_for(asyncio.shield(relay), 10)
        except Exception:  # noqa: BLE001  (a lost replica, a slow close: drop the relay)
            relay.cancel()


class RayBackend:
    """The app's backend on the ingress replica: a handle to the generator deployment."""

    def __init__(self, cfg: DictConfig, generator) -> None:
        self.cfg, self.generator = cfg, generator
        self.hello = None

    async def start(self) -> None:
        self.hello = await self.generator.hello.remote()

    def channel(self, out, raw_frames: bool = False) -> RayChannel:
        return RayChannel(self, out, raw_frames)

    async def status(self) -> dict:
        replicas = replica_stats()
        total = {k: sum(r.get(k) or 0 for r in replicas)
                 for k in ("active_sessions", "live_sessions", "max_sessions", "spare_sessions")}  # fmt: skip
        return {"backend": "ray", **total, "num_replicas": len(replicas), "replicas": replicas}

    def shutdown(self) -> None:
        pass


@serve.ingress()
class Ingress:
    """The ingress replica: the flashdreams app (page, status, both WebSocket protocols)."""

    async def __init__(self, cfg: dict, generator) -> None:
        self.cfg = OmegaConf.create(cfg)
        self.backend = RayBackend(self.cfg, generator)
        await self.backend.start()

    def __serve_build_asgi_app__(self):
        return create_app(self.cfg, backend=self.backend)


def build_app(cfg: DictConfig):
    """The Ray Serve application of a serve config (``serve.run`` deploys it)."""
    s = cfg.serve
    plain = OmegaConf.to_container(cfg, resolve=True)
    gpus = s.gpus_per_replica if str(cfg.device).startswith("cuda") else 0
    # Ray pins an actor's torch to its num_cpus (1) threads; on CPU split the cores instead
    threads = {} if gpus else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // s.replicas))}
    generator = serve.deployment(Generator, name="Generator").options(
        num_replicas=s.replicas, max_ongoing_requests=4 * s.max_sessions + 64,
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus, "runtime_env": {"env_vars": threads}},
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={
                "max_sessions": s.max_sessions}, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
    )  # fmt: skip
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(plain, generator.bind(plain))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve_ray(cfg: DictConfig) -> None:
    """Start (or join) Ray, deploy, serve until interrupted; the port is checked first."""
    s = cfg.serve
    sock = bind_socket(s.host, s.port)  # a port in use fails here, before Ray starts
    port = sock.getsockname()[1]
    sock.close()
    if s.ray_address is None:
        root = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        ray.init(num_cpus=s.ray_num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})  # fmt: skip
    else:
        ray.init(address=s.ray_address, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": s.host, "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        print(f"flashdreams-serve: listening on http://{s.host}:{port}/ (recipe {cfg.run_name}, "
              f"backend=ray, replicas={s.replicas}, max_sessions={s.max_sessions} each)", flush=True)  # fmt: skip
        if s.port_file:
            Path(s.port_file).write_text(str(port))
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
