"""Fragmented MP4 (``m4s``) from raw RGB frames, one fragment per chunk of frames.

The ffmpeg binary that ``imageio-ffmpeg`` ships encodes H.264 (``-tune zerolatency``: no
lookahead, no B-frames, one packet out per frame in) into FLV on a pipe: FLV writes each
packet at once as a length-prefixed tag, while ffmpeg's MP4 muxer holds a fragment's last
sample back until the next packet arrives. The boxes are written here (ISO/IEC 14496-12):
``ftyp`` + ``moov`` (one ``avc1`` track, ``mvex``) as the init segment, then per chunk one
``moof`` (``mfhd``, ``traf`` with ``tfhd`` default-base-is-moof, ``tfdt``, ``trun``) and its
``mdat``. Concatenated in order the chunks are one playable fragmented MP4 (browsers' Media
Source Extensions, ffmpeg), and each chunk is complete as soon as its frames are encoded.
"""

from __future__ import annotations

import asyncio
import struct

_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_KEY, _NON_KEY = 0x02000000, 0x01010000  # sample flags: sync / depends on others, non-sync


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def init_segment(width: int, height: int, timescale: int, avcc: bytes) -> bytes:
    """``ftyp`` + ``moov`` of one H.264 video track (track 1) of unknown duration."""
    ftyp = box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6avc1mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIIIIH10x", 0, 0, 1000, 0, 0x10000, 0x100),
                    _MATRIX, bytes(24), struct.pack(">I", 2))  # fmt: skip
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII8xHHH2x", 0, 0, 1, 0, 0, 0, 0, 0),
                    _MATRIX, struct.pack(">II", width << 16, height << 16))  # fmt: skip
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"vide"), b"VideoHandler\0")
    avc1 = box(b"avc1", bytes(6), struct.pack(">HHH12xHHIIIH32xHh", 1, 0, 0, width, height,
                                               0x480000, 0x480000, 0, 1, 0x18, -1),
               box(b"avcC", avcc))  # fmt: skip
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
               full_box(b"stts", 0, 0, bytes(4)), full_box(b"stsc", 0, 0, bytes(4)),
               full_box(b"stsz", 0, 0, bytes(8)), full_box(b"stco", 0, 0, bytes(4)))  # fmt: skip
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    minf = box(b"minf", full_box(b"vmhd", 0, 1, bytes(8)), dinf, stbl)
    trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, minf))
    mvex = box(b"mvex", full_box(b"trex", 0, 0, struct.pack(">IIIII", 1, 1, 0, 0, 0)))
    return ftyp + box(b"moov", mvhd, trak, mvex)


def fragment(sequence: int, decode_time: int, duration: int, samples: list[tuple[bytes, bool]]
             ) -> bytes:  # fmt: skip
    """``moof`` + ``mdat`` of (AVCC sample, is keyframe) pairs of equal ``duration``."""

    def moof(data_offset: int) -> bytes:
        trun = full_box(b"trun", 0, 0x000701, struct.pack(">Ii", len(samples), data_offset),
                        *(struct.pack(">III", duration, len(s), _KEY if key else _NON_KEY)
                          for s, key in samples))  # fmt: skip
        traf = box(b"traf", full_box(b"tfhd", 0, 0x020000, struct.pack(">I", 1)),
                   full_box(b"tfdt", 1, 0, struct.pack(">Q", decode_time)), trun)  # fmt: skip
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), traf)

    size = len(moof(0))
    return moof(size + 8) + box(b"mdat", *(s for s, _ in samples))


class FragmentedMP4Encoder:
    """An async H.264 fMP4 encoder of (H, W, 3) uint8 RGB frames, one fragment per ``encode``.

    Args:
        width, height: frame size in pixels (even: yuv420p).
        fps: frame rate written into the stream.
        crf: x264 constant rate factor (quality; lower is better).
    """

    def __init__(self, width: int, height: int, fps: float, crf: int = 23) -> None:
        self.width, self.height, self.fps, self.crf = width, height, fps, crf
        self.timescale = max(1, round(fps * 1000))
        self.duration = round(self.timescale / fps)  # per frame, in timescale units
        self.proc: asyncio.subprocess.Process | None = None
        self.avcc: bytes | None = None
        self.sequence = 0
        self.decode_time = 0

    async def _open(self) -> None:
        import imageio_ffmpeg

        args = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
            "-r", f"{self.fps:g}", "-i", "pipe:0", "-an", "-c:v", "libx264",
            "-preset", "ultrafast", "-tune", "zerolatency", "-crf", str(self.crf),
            "-pix_fmt", "yuv420p", "-g", str(max(1, round(self.fps))), "-f", "flv",
            "-flush_packets", "1", "pipe:1",
        ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self.header_read = False

    async def _next_sample(self) -> tuple[bytes, bool]:
        """The next encoded frame (AVCC NAL units, keyframe); keeps the sequence header."""
        read = self.proc.stdout.readexactly
        if not self.header_read:  # written once the first frame is encoded
            await read(13)  # FLV header + the first previous-tag size
            self.header_read = True
        while True:
            head = await read(11)
            kind, size = head[0], int.from_bytes(head[1:4], "big")
            data = (await read(size + 4))[:size]  # the tag, then its trailing size field
            if kind != 9 or len(data) < 5 or data[0] & 0x0F != 7:  # not an H.264 video tag
                continue
            if data[1] == 0:  # AVCDecoderConfigurationRecord
                self.avcc = data[5:]
            elif data[1] == 1:
                return data[5:], data[0] >> 4 == 1

    async def encode(self, frames: list[bytes]) -> bytes:
        """The fMP4 bytes of these frames (each ``width * height * 3`` RGB bytes); the first
        call's bytes start with the init segment."""
        size = self.width * self.height * 3
        for frame in frames:
            if len(frame) != size:
                raise ValueError(f"frame of {len(frame)} bytes; expected {size} "
                                 f"({self.width}x{self.height} RGB)")  # fmt: skip
        if not frames:
            return b""
        first = self.proc is None
        if first:
            await self._open()

        async def write() -> None:
            self.proc.stdin.write(b"".join(frames))
            await self.proc.stdin.drain()

        writer = asyncio.create_task(write())
        try:
            samples = [await self._next_sample() for _ in frames]
        finally:
            await writer
        self.sequence += 1
        out = fragment(self.sequence, self.decode_time, self.duration, samples)
        self.decode_time += self.duration * len(samples)
        if first:
            out = init_segment(self.width, self.height, self.timescale, self.avcc) + out
        return out

    async def close(self) -> None:
        """Stop the encoder process."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        except (asyncio.TimeoutError, OSError):
            proc.kill()
            await proc.wait()
