"""Schema of ``flashdreams-serve``'s config: the run config plus a ``serve`` block.

Registered in Hydra's ConfigStore as ``base_serve`` (package ``serve``); ``conf/serve.yaml``
composes the whole run config (``- run``) and then this schema into ``serve`` only, so the
recipe's settings stay as ``flashdreams-run`` composes them, and a misspelled ``serve.*`` key or
a wrong type fails at composition. No torch import here (``--help`` stays fast).
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from flashdreams.config import schema  # noqa: F401  (base_run, which serve.yaml composes)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # interface to bind
    port: int = 8000  # TCP port; 0 picks a free one
    port_file: str | None = None  # write the bound port to this file once listening
    max_sessions: int = 1  # concurrent generating sessions (GPU work); more clients get "busy"
    max_message_bytes: int = 65536  # largest accepted client message
    max_prompt_chars: int = 2000  # longest accepted prompt
    max_frame_bytes: int = 4194304  # largest binary control frame (HDMap PNG / JPEG + header)
    max_frame_pixels: int = (
        16777216  # largest control frame image (width x height, from its header)
    )
    max_messages_per_s: float = 100.0  # client messages per second per connection (0: no limit)
    message_burst: int = 200  # messages a connection may send at once within the rate
    queue_frames: int = 64  # per-client outgoing frame queue; oldest frames dropped when full
    jpeg_quality: int = 85  # JPEG quality of streamed frames (1-95)
    realtime: bool = True  # pace generation at `fps` so the stream never runs far ahead
    lead_s: float = 1.0  # seconds of video generated ahead of real time when realtime
    send_buffer_bytes: int = 0  # kernel send buffer per client (0: OS default)
    total_blocks: int | None = None  # AR steps when `start` names none (null: endless)
    max_session_bytes: int | None = None  # memory one session may take (null: free / max_sessions)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names besides loopback's
    allowed_origins: list[str] = field(default_factory=list)  # cross-site page origins allowed
    backend: str = "local"  # local (this process) | ray (generator replicas on Ray Serve)
    replicas: int = 1  # ray: generator replicas (one per GPU, or per group of gpus_per_replica)
    gpus_per_replica: int = 1  # ray, device=cuda: GPUs each replica holds
    ray_address: str | None = None  # ray: null starts a local Ray; "auto" / "host:port" joins
    ray_num_cpus: int | None = None  # ray: CPUs of a local Ray (null: all)
    realtime_model: str | None = None  # /v1/realtime/video model name (null: the run_name)


def register() -> None:
    """Store the schema (idempotent): ``base_serve`` fills and types the run config's ``serve``."""
    ConfigStore.instance().store(name="base_serve", node=ServeConfig, package="serve")


register()


def check_serve(serve) -> None:
    """Range checks the schema's types cannot express; raises ``ConfigError``."""
    from flashdreams import ConfigError

    bounds = {
        "port": (0, 65535), "max_sessions": (1, None), "max_message_bytes": (256, None),
        "max_prompt_chars": (1, None), "max_frame_bytes": (256, None), "max_frame_pixels": (1, 2**26),
        "queue_frames": (1, None), "max_messages_per_s": (0, None), "message_burst": (1, None),
        "jpeg_quality": (1, 95), "send_buffer_bytes": (0, None), "lead_s": (0, None),
        "replicas": (1, None), "gpus_per_replica": (0, None),
    }  # fmt: skip
    for key, (lo, hi) in bounds.items():
        value = serve[key]
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"serve.{key}={value} must be {allowed}")
    if serve.backend not in ("local", "ray"):
        raise ConfigError(f"serve.backend={serve.backend} must be local or ray")
    if serve.ray_num_cpus is not None and serve.ray_num_cpus < 1:
        raise ConfigError(f"serve.ray_num_cpus={serve.ray_num_cpus} must be >= 1 or null")
    if serve.total_blocks is not None and serve.total_blocks < 1:
        raise ConfigError(f"serve.total_blocks={serve.total_blocks} must be >= 1 or null")
    if serve.max_session_bytes is not None and serve.max_session_bytes < 1:
        raise ConfigError(f"serve.max_session_bytes={serve.max_session_bytes} must be >= 1 or "
                          "null")  # fmt: skip
    for key in ("allowed_hosts", "allowed_origins"):
        for item in serve[key]:
            if not isinstance(item, str) or not item.strip() or item.strip().lower() == "null":
                raise ConfigError(f"serve.{key}: {item!r} is not a host name / origin")
