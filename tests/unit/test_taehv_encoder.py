"""TAEHV's encoder (``flashdreams.vae.taehv_encode``) and the OmniDreams recipe that encodes the
HDMap with it (CPU, float32, tiny widths):

* the parallel encode equals an independent frame-by-frame walk of TAEHV's semantics (each
  MemBlock reads its input one frame earlier, zeros before the first; each TPool merges
  ``stride`` consecutive frames; the clip padded with its last frame to 4 n frames);
* a stream of 4, then 8-frame steps equals the whole-clip encode (the carried MemBlock inputs);
* a file in ``taew2_1``'s layout (``encoder.*`` and ``decoder.*``, fp16) loads into the encoder
  and the decoder; a missing key is a one-line error naming it;
* ``HDMapControl`` reads latent frame j from video frames [4 j, 4 j + 4) through it, the clip's
  last frame repeated past its end, and the recipe runs end to end through the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.io.checkpoint import CheckpointError
from flashdreams.io.video import read_video_frames
from flashdreams.vae.taehv import MemBlock, TAEHVDecoder
from flashdreams.vae.taehv_encode import TAEHVEncoder, TPool
from tests.unit.test_cli import _only, _run
from tests.unit.test_config import compose_run
from tests.unit.test_omnidreams_cli import SIZE, _hdmap, _image

WIDTH = 8


def _sequential(encoder: TAEHVEncoder, video: torch.Tensor) -> torch.Tensor:
    """TAEHV's encoder one frame at a time (the reference semantics, written independently of
    the parallel pass): video (1, 3, T, H, W) in [-1, 1] -> (1, C, ceil(T / 4), h, w)."""
    frames = [(video[:, :, t] + 1) / 2 for t in range(video.shape[2])]
    frames += [frames[-1]] * (-len(frames) % 4)
    for layer in encoder.encoder:
        if isinstance(layer, MemBlock):
            past, out = torch.zeros_like(frames[0]), []
            for x in frames:
                out.append(layer(x, past))
                past = x
            frames = out
        elif isinstance(layer, TPool):
            s = layer.stride
            frames = [layer.conv(torch.cat(frames[i : i + s], 1)) for i in range(0, len(frames), s)]
        else:
            frames = [layer(x) for x in frames]
    return torch.stack(frames, 2)


def _video(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 32, 48, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", [8, 13])
def test_parallel_encode_equals_the_frame_by_frame_walk(frames):
    enc = TAEHVEncoder(width=WIDTH).eval()
    video = _video(frames)
    got = enc.encode(video)
    assert got.shape == (1, 16, -(-frames // 4), 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(got, _sequential(enc, video), rtol=1e-4, atol=1e-4)


def test_streamed_steps_equal_the_whole_clip():
    enc = TAEHVEncoder(width=WIDTH).eval()
    video = _video(20)
    cache, parts = enc.new_cache(), []
    with torch.no_grad():
        for lo, hi in ((0, 4), (4, 12), (12, 20)):
            z, cache = enc.encode_step(video[:, :, lo:hi], cache)
            parts.append(z)
    torch.testing.assert_close(torch.cat(parts, 2), enc.encode(video), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 4"):
        enc.encode_step(video[:, :, :5], enc.new_cache())


def _taew_file(path, drop: str | None = None):
    """A tiny file in taew2_1's layout: encoder and decoder keys, fp16 as the release."""
    enc = TAEHVEncoder(width=WIDTH, seed=3)
    dec = TAEHVDecoder(channels=(16, 8, 8, 8), seed=4)
    state = {**{k: v.half() for k, v in enc.state_dict().items()},
             **{k: v.half() for k, v in dec.state_dict().items()}}  # fmt: skip
    state.pop(drop, None)
    torch.save(state, path)
    return state


def test_taew_file_loads_into_encoder_and_decoder(tmp_path):
    state = _taew_file(tmp_path / "taew2_1.pth")
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
    assert "encoder.2.conv.weight" in state and "encoder.17.weight" in state  # TPool, head
    enc = TAEHVEncoder(checkpoint=str(tmp_path / "taew2_1.pth"), width=WIDTH)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, state[k].float(), rtol=0, atol=0)
    TAEHVDecoder(checkpoint=str(tmp_path / "taew2_1.pth"), channels=(16, 8, 8, 8))
    _taew_file(tmp_path / "broken.pth", drop="encoder.4.conv.0.weight")
    with pytest.raises(CheckpointError, match="encoder.4.conv.0.weight"):
        TAEHVEncoder(checkpoint=str(tmp_path / "broken.pth"), width=WIDTH)


def test_raw_latent_files_are_normalized():
    raw = TAEHVEncoder(width=WIDTH, raw_latents=True).eval()
    plain = TAEHVEncoder(width=WIDTH).eval()
    video = _video(8)
    torch.testing.assert_close(raw.encode(video) * raw.latent_std + raw.latent_mean, plain.encode(video),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


TINY = ["recipe=omnidreams_single_view_taehv", "model=omnidreams_tiny", "model.checkpoint=null",
        "text_encoder=random", "vae=preview", "device=cpu", "dtype=float32",
        f"rollout.height={SIZE}", f"rollout.width={SIZE}", "rollout.total_blocks=2",
        "control.encoder.checkpoint=null", f"control.encoder.width={WIDTH}",
        "control.encoder.dtype=float32", "conditioner.encoder.checkpoint=null",
        "conditioner.encoder.base_dim=8"]  # fmt: skip


def test_hdmap_control_reads_taehv_aligned_frames(tmp_path):
    hdmap = _hdmap(tmp_path / "clip_hdmap.mp4", 13)  # the 2-block clip: 13 frames, TAEHV reads 16
    cfg = compose_run([*TINY, f"control.video={hdmap}", f"image={tmp_path / 'first.png'}"])
    assert cfg.control.encoder._target_.endswith("TAEHVEncoder")
    assert "base_dim" not in cfg.control.encoder  # the fast recipe's LightVAE width stays there
    control = instantiate(cfg.control)
    control.prepare(None, height=SIZE, width=SIZE, num_frames=4, device="cpu")
    got = torch.cat([control.inputs(0, 2)["hdmap"], control.inputs(2, 2)["hdmap"]], 2)
    frames = torch.stack([torch.from_numpy(np.array(f)) for f in read_last_frames(str(hdmap), 13)])
    video = (frames.permute(3, 0, 1, 2)[None].float() / 255.0) * 2 - 1  # as the control's pixels
    want = control.encoder.encode(video)  # the last frame repeated to 16 frames
    assert got.shape == want.shape == (1, 16, 4, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    shifted = control.encoder.encode(torch.cat([video[:, :, :1]] * 3 + [video], 2))
    assert not torch.allclose(got, shifted[:, :, :4], atol=1e-3)  # not the Wan alignment


def test_taehv_recipe_runs_through_the_cli(tmp_path):
    hdmap = _hdmap(tmp_path / "clip_hdmap.mp4", 13)
    _run([*TINY, f"image={_image(tmp_path / 'first.png')}", f"control.video={hdmap}"], tmp_path)
    run_dir = _only("outputs/runs/omnidreams_single_view_taehv/*", tmp_path)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["status"] == "completed" and len(stats["steps"]) == 2
    assert read_video_frames(run_dir / "video.mp4") == 13
