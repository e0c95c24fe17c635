"""Chaining: a generation stream upscaled as it comes (``postprocess=flashvsr_v1_1_tiny``) gives
the frames of generating to a (lossless) file and upscaling that file with ``input=``, in a
``Session`` and through ``flashdreams-run``.

Tolerance: fp32 on the CPU, max abs error <= 1e-5 (the same computation in another order of
calls; observed 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from flashdreams.io.video import read_video
from flashdreams.session import Session
from tests.unit.test_flashvsr_recipe import ROOT

GEN = ["recipe=demo", "rollout.height=32", "rollout.width=32", "rollout.total_blocks=2",
       "device=cpu", "dtype=float32", "seed=3"]  # fmt: skip
# 2 blocks x 3 latent frames = 21 frames -> 25 after the release's padding: 6 latents, 3 chunks


def _vsr(prompt_path) -> list[str]:
    return ["model.checkpoint=null", "model.dim=64", "model.num_heads=2", "model.num_layers=2",
            "model.ffn_dim=128", "model.text_dim=16", "model.text_len=4",
            f"text_encoder.path={prompt_path}", "control.checkpoint=null", "control.hidden_dim1=8",
            "control.hidden_dim2=8", "control.dtype=float32", "vae.decoder.checkpoint=null",
            "vae.decoder.channels=[8,8,4,4]", "graph=eager", "attention=sdpa",
            "vsr.size_multiple=16", "vsr.scale=2", "vsr.color_fix=wavelet"]  # fmt: skip


def _frames(outs) -> torch.Tensor:
    return torch.cat([f for f in outs if f is not None and f.shape[1]], dim=1)


def test_chained_session_equals_upscaling_the_generated_file(tmp_path):
    prompt = tmp_path / "posi_prompt.pth"
    torch.save(torch.randn(1, 4, 16), prompt)
    vsr = _vsr(prompt)
    quoted = ",".join(f'"{o}"' for o in vsr)
    chained = Session.from_overrides([*GEN, "postprocess=flashvsr_v1_1_tiny",
                                      f"postprocess.overrides=[{quoted}]"], total_blocks=2)  # fmt: skip
    steps = list(chained)
    got = _frames(steps)
    assert steps[0] is None or steps[0].shape[1] < got.shape[1]  # it streams, lagging the source

    # generate, write the frames to a lossless file, upscale the file
    gen = Session.from_overrides(GEN, total_blocks=2)
    frames = (_frames(list(gen))[0].clamp(0, 1) * 255).round().to(torch.uint8)  # (T, 3, H, W)
    path = tmp_path / "generated.mov"
    writer = imageio_ffmpeg.write_frames(str(path), (32, 32), fps=16, codec="png",
                                         pix_fmt_out="rgb24", macro_block_size=1)  # fmt: skip
    writer.send(None)
    for frame in frames.permute(0, 2, 3, 1).numpy():
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()
    assert read_video(path)[0].shape == (21, 32, 32, 3)
    upscaled = Session.from_overrides(["recipe=flashvsr_v1_1_tiny", f"input={path}", *vsr,
                                       "vsr.resize=torch", "device=cpu", "dtype=float32",
                                       "seed=3"])  # fmt: skip
    assert upscaled.total_blocks == 1 and upscaled.rollout.height == 64  # 6 latents: one chunk
    want = _frames(list(upscaled))
    assert got.shape == want.shape == (1, 21, 3, 64, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_chained_run_through_the_cli(tmp_path):
    prompt = tmp_path / "posi_prompt.pth"
    torch.save(torch.randn(1, 4, 16), prompt)
    quoted = ",".join(f'"{o}"' for o in _vsr(prompt))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", *GEN,
                           "postprocess=flashvsr_v1_1_tiny", f"postprocess.overrides=[{quoted}]",
                           f"paths.root={tmp_path / 'out'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "out" / "runs").glob("*/*")
    assert read_video(run / "video.mp4")[0].shape == (21, 64, 64, 3)  # upscaled 2x
    assert read_video(run / "video_source.mp4")[0].shape == (21, 32, 32, 3)
    stats = json.loads((run / "stats.json").read_text())
    assert len(stats["steps"]) == 2 and len(stats["postprocess"]) == 1  # one chunk of 6 latents
    row = stats["postprocess"][0]
    assert {"diffuse_ms", "decode_ms", "step_ms", "projector_ms", "dit_ms"} <= set(row)
    assert 0 < row["projector_ms"] <= row["diffuse_ms"]  # the projector runs inside the diffuse
    assert row["dit_ms"] == pytest.approx(row["diffuse_ms"] - row["projector_ms"])  # the DiT alone


def test_the_server_streams_the_chained_frames(tmp_path):
    """``flashdreams-serve`` with ``postprocess=``: ``hello`` and ``started`` give the upscaled
    size and the stream delivers the chained session's frames (the same JPEG bytes),
    the post-processing weights loaded once by the server, a fresh stream state per session."""
    import io

    from PIL import Image

    from flashdreams.serve.protocol import encode_jpeg
    from tests.unit.test_serve_protocol import ServerProcess, recv_frames, recv_json, send
    from tests.unit.test_serve_realtime import check_stream, decode, realtime_session

    prompt = tmp_path / "posi_prompt.pth"
    torch.save(torch.randn(1, 4, 16), prompt)
    quoted = ",".join(f'"{o}"' for o in _vsr(prompt))
    chain = [*GEN, "postprocess=flashvsr_v1_1_tiny", f"postprocess.overrides=[{quoted}]"]
    want = _frames(list(Session.from_overrides(chain, total_blocks=2)))[0]  # (21, 3, 64, 64)
    server = ServerProcess(tmp_path, *chain, "serve.realtime=false", timeout=180)
    try:
        for _ in range(2):  # a second session: the spare's postprocess restarted, same frames
            with server.ws() as ws:
                hello = recv_json(ws, "hello", timeout=60)
                assert (hello["height"], hello["width"]) == (64, 64)
                send(ws, type="start", prompt=hello["prompt"], seed=3, total_blocks=2)
                started = recv_json(ws, "started", timeout=60)
                assert (started["height"], started["width"]) == (64, 64)
                frames = recv_frames(ws, want.shape[0], timeout=120)
                assert recv_json(ws, "stopped", timeout=60)["reason"] == "finished"
            got = np.stack([np.asarray(Image.open(io.BytesIO(jpeg))) for _, jpeg in frames])
            assert got.shape == (21, 64, 64, 3)
            ref = (want.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            assert [jpeg for _, jpeg in frames] == [encode_jpeg(f, 85) for f in ref]  # same bytes
        # vLLM-Omni's protocol on the same server: the upscaled frames, an explicit size refused
        run = realtime_session(server.port, {"model": hello["run_name"], "prompt": hello["prompt"],
                                             "seed": 3, "num_frames": 21})  # fmt: skip
        check_stream(run, 21, tmp_path)
        assert (run["events"][0]["config"]["width"], run["events"][0]["config"]["height"]) == (
            64,
            64,
        )
        assert decode(b"".join(run["chunks"]), tmp_path)[0].shape == (64, 64, 3)
        bad = realtime_session(server.port, {"prompt": "x", "size": "64x64"})
        assert bad["events"][-1]["type"] == "error" and "leave size unset" in str(bad["events"][-1])
    finally:
        server.close()
