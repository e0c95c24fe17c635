"""The WebSocket protocol of ``flashdreams-serve`` (documented in the README, "Serving").

Client -> server: JSON text messages with a ``type``::

    {"type": "start", "prompt": "...", "seed": 0, "total_blocks": null}
    {"type": "prompt", "text": "..."}
    {"type": "control", ...any control fields...}     e.g. {"type": "control", "keys": ["w"]}
    {"type": "pause"} / {"type": "resume"} / {"type": "stop"}

Client -> server, binary: one control frame per message (recipes whose control takes streamed
frames, e.g. OmniDreams' HDMap): ``CONTROL_FRAME_HEADER`` (magic ``FDM1``, the video frame of the
stream it conditions, ``NEXT_FRAME`` = right after the last one sent) followed by a PNG or JPEG.

Server -> client: JSON text messages (``hello``, ``started``, ``prompt``, ``paused``,
``resumed``, ``stopped``, ``error``) and one binary message per video frame: a fixed
little-endian header (``FRAME_HEADER``) followed by the frame as a JPEG file.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
FRAME_MAGIC = b"FDF1"
# magic, step, frame, index in block, frames in block, batch index, batch size,
# step_ms, period_ms, dropped, prompt version
FRAME_HEADER = struct.Struct("<4sIIHHHHffII")
FRAME_HEADER_DROPPED = struct.Struct("<I")  # rewritten at send time, at FRAME_HEADER.size - 8
CONTROL_FRAME_MAGIC = b"FDM1"
# magic, video frame index in the stream the frame conditions (NEXT_FRAME: after the last one)
CONTROL_FRAME_HEADER = struct.Struct("<4sI")
NEXT_FRAME = 0xFFFFFFFF
CONTROL_FRAME_FORMATS = ("PNG", "JPEG")
MAX_CONTROL_FRAME_PIXELS = 4096 * 4096  # default decoded size limit (serve.max_frame_pixels)
MESSAGE_TYPES = ("start", "prompt", "control", "pause", "resume", "stop")
_FIELDS = {
    "start": {"type", "prompt", "seed", "total_blocks"},
    "prompt": {"type", "text"},
    "pause": {"type"},
    "resume": {"type"},
    "stop": {"type"},
}


@dataclass(frozen=True)
class Oversize:
    """Stands for a client message that was dropped unread past the size limit."""

    size: int  # bytes received before the message ended (at least the limit + 1)
    binary: bool = False  # a binary message (its limit: serve.max_frame_bytes for frame recipes)


class ProtocolError(ValueError):
    """A client message the server rejects; sent back as an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class FrameInfo:
    """Header fields of one binary frame message."""

    step: int  # AR step that produced the frame
    frame: int  # index of the frame in its video stream
    index_in_block: int  # index of the frame among its step's frames
    frames_in_block: int  # frames the step produced
    batch_index: int  # which video of the batch
    batch_size: int  # videos generated together
    step_ms: float  # step latency (encode + diffuse + decode, + recache on a switch)
    period_ms: float  # block period (step latency + commit)
    dropped: int  # frames dropped so far for this client (slow reader)
    prompt_version: int  # 0 for the start prompt, +1 per prompt switch that took effect


def parse_message(
    raw: str | bytes | Oversize | None, max_bytes: int, max_prompt_chars: int
) -> dict:
    """Decode and validate one client message.

    Args:
        raw: the text of a WebSocket message (bytes for a binary message, ``Oversize`` for one
            dropped unread past the limit).
        max_bytes: size limit in bytes.
        max_prompt_chars: longest prompt accepted.

    Returns:
        The message as a dict with a known ``type``.

    Raises:
        ProtocolError: the message is binary, too large, not JSON, or not a valid message.
    """
    size = raw.size if isinstance(raw, Oversize) else len(raw) if raw is not None else 0
    if isinstance(raw, str):
        size = len(raw.encode(errors="surrogatepass"))
    if size > max_bytes:
        raise ProtocolError("too_large", f"message of {size}{'+' * isinstance(raw, Oversize)} "
                            f"bytes exceeds serve.max_message_bytes={max_bytes}")  # fmt: skip
    if raw is None or isinstance(raw, bytes):
        raise ProtocolError("binary", "binary messages are not accepted; send JSON text")
    try:
        msg = json.loads(raw)
    except ValueError as err:
        raise ProtocolError("bad_json", f"message is not valid JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("bad_json", "message is not valid JSON: nested too deeply") from None
    except Exception as err:  # noqa: BLE001  (any parse failure is the client's)
        raise ProtocolError(
            "bad_json", f"message is not valid JSON ({type(err).__name__})"
        ) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", 'message must be a JSON object with a string "type"')
    kind = msg["type"]
    if kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; "
                            f"known: {', '.join(MESSAGE_TYPES)}")  # fmt: skip
    extra = set(msg) - _FIELDS.get(kind, set(msg))
    if extra:
        raise ProtocolError("bad_message", f"{kind}: unknown field(s) {sorted(extra)}")
    if kind == "start":
        _check_text(msg, "prompt", max_prompt_chars, required=False)
        for key in ("seed", "total_blocks"):
            value = msg.get(key)
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            if not ok or (value is not None and not 0 <= value < 2**63):
                raise ProtocolError("bad_message", f"start: {key} must be a non-negative integer"
                                    " or null")  # fmt: skip
        if msg.get("total_blocks") == 0:
            raise ProtocolError("bad_message", "start: total_blocks must be >= 1 or null")
    elif kind == "prompt":
        _check_text(msg, "text", max_prompt_chars, required=True)
    return msg


def is_control_frame(raw) -> bool:
    """Whether a client message is a binary control frame (by its magic)."""
    return isinstance(raw, bytes) and raw[:4] == CONTROL_FRAME_MAGIC


def check_control_frame(raw, frames_ahead: int, run_name: str, max_frame_bytes: int) -> bool:
    """Whether ``raw`` is a control frame for the stream to decode (what both backends check
    before handing one on); False for any other message (parsed as JSON text).

    Raises:
        ProtocolError: ``too_large`` for a binary message past ``max_frame_bytes`` (an
            ``Oversize`` marker, or whole bytes where no filter dropped it) of a recipe that
            takes frames; ``binary`` for a control frame to a recipe that takes none
            (``frames_ahead`` = 0).
    """
    size = None
    if frames_ahead and isinstance(raw, Oversize) and raw.binary:
        size = f"{raw.size}+"
    elif frames_ahead and is_control_frame(raw) and len(raw) > max_frame_bytes:
        size = str(len(raw))
    if size is not None:
        raise ProtocolError("too_large", f"binary message of {size} bytes exceeds "
                            f"serve.max_frame_bytes={max_frame_bytes}")  # fmt: skip
    if not is_control_frame(raw):
        return False
    if not frames_ahead:
        raise ProtocolError("binary", f"control frame: recipe {run_name} takes no streamed "
                            "control frames (hello.control_frames=0); send JSON text")  # fmt: skip
    return True


def parse_control_frame(data: bytes, max_pixels: int = MAX_CONTROL_FRAME_PIXELS,
                        run_size: tuple[int, int] | None = None
                        ) -> tuple[int | None, np.ndarray]:  # fmt: skip
    """Decode a binary control frame message.

    The image's size is read from its header (PIL's ``Image.open`` decodes no pixels) and an
    image past ``max_pixels`` is refused before its pixels are decoded (a small PNG can
    declare a huge image: a decompression bomb), and so is one whose aspect ratio is not
    ``run_size``'s ((width, height) of the run, when given).

    Returns:
        (video frame index or None for "next", (H, W, 3) uint8 RGB frame).

    Raises:
        ProtocolError: ``bad_frame`` for a short header, another image format or one that does
            not decode or of another aspect ratio than ``run_size``; ``too_large`` for an image
            past ``max_pixels`` (``serve.max_frame_pixels``).
    """
    from PIL import Image

    if len(data) <= CONTROL_FRAME_HEADER.size or data[:4] != CONTROL_FRAME_MAGIC:
        raise ProtocolError("bad_frame", "a control frame is the FDM1 header + a PNG or JPEG")
    _, index = CONTROL_FRAME_HEADER.unpack_from(data)
    too_large = f"is too large (serve.max_frame_pixels={max_pixels}); it was not decoded"
    try:
        img = Image.open(io.BytesIO(data[CONTROL_FRAME_HEADER.size :]),
                         formats=CONTROL_FRAME_FORMATS)  # fmt: skip
        if img.width * img.height > max_pixels:
            raise ProtocolError("too_large", f"control frame of {img.width}x{img.height} "
                                f"pixels {too_large}")  # fmt: skip
        if run_size is not None:
            from flashdreams.control.video_frames import same_aspect

            if not same_aspect(img.width, img.height, *run_size):
                raise ProtocolError("bad_frame", f"control frame of {img.width}x{img.height} "
                                    f"pixels: the run is {run_size[0]}x{run_size[1]}; send "
                                    "frames of its aspect ratio")  # fmt: skip
        frame = np.asarray(img.convert("RGB"))
    except ProtocolError:
        raise
    except Image.DecompressionBombError:  # past PIL's own limit, refused by Image.open
        raise ProtocolError("too_large", f"control frame {too_large}") from None
    except Image.UnidentifiedImageError:
        raise ProtocolError("bad_frame", "control frame: not a PNG or JPEG image; send "
                            f"{' or '.join(CONTROL_FRAME_FORMATS)}") from None  # fmt: skip
    except Exception as err:  # noqa: BLE001  (any decode failure is the client's)
        raise ProtocolError("bad_frame", f"control frame does not decode "
                            f"({type(err).__name__})") from None  # fmt: skip
    return (None if index == NEXT_FRAME else index), frame


def pack_control_frame(image: bytes, index: int | None = None) -> bytes:
    """One binary control frame message: header + PNG / JPEG bytes (clients, tests)."""
    return CONTROL_FRAME_HEADER.pack(CONTROL_FRAME_MAGIC,
                                     NEXT_FRAME if index is None else index) + image  # fmt: skip


def _check_text(msg: dict[str, Any], key: str, max_chars: int, required: bool) -> None:
    value = msg.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise ProtocolError("bad_message", f"{msg['type']}: {key} must be a non-empty string")
    if len(value) > max_chars:
        raise ProtocolError("bad_message", f"{msg['type']}: {key} has {len(value)} characters "
                            f"(serve.max_prompt_chars={max_chars})")  # fmt: skip


def event(kind: str, **fields: Any) -> str:
    """A server JSON message."""
    return json.dumps({"type": kind, **fields})


def error(code: str, message: str) -> str:
    """A server ``error`` message."""
    return event("error", code=code, message=message)


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of one (H, W, 3) uint8 RGB frame."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pack_frame(info: FrameInfo, jpeg: bytes) -> bytes:
    """One binary frame message: header + JPEG."""
    header = FRAME_HEADER.pack(
        FRAME_MAGIC, info.step, info.frame, info.index_in_block, info.frames_in_block,
        info.batch_index, info.batch_size, info.step_ms, info.period_ms, info.dropped,
        info.prompt_version,
    )  # fmt: skip
    return header + jpeg


def unpack_frame(data: bytes) -> tuple[FrameInfo, bytes]:
    """Split a binary frame message into its header fields and JPEG bytes (clients, tests)."""
    fields = FRAME_HEADER.unpack_from(data)
    if fields[0] != FRAME_MAGIC:
        raise ValueError(f"not a flashdreams frame message (magic {fields[0]!r})")
    return FrameInfo(*fields[1:]), data[FRAME_HEADER.size :]
