"""FlashVSR v1.1 recipe: composes with the release's settings; a tiny 4x run of an mp4 goes
through flashdreams-run; the DiT loads a safetensors file with the release's (Wan original) key
names and the projector its ``.ckpt``; a missing / too short video fails in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flashdreams import ConfigError
from flashdreams.build import build_conditioning
from flashdreams.control.lr_video import LRVideoControl
from flashdreams.io.video import read_video
from flashdreams.model.flashvsr import FlashVSRDiT, LRProjector
from flashdreams.text_encoder.prompt_tensor import PromptTensorTextEncoder
from tests.unit.test_config import compose_run

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(dim=64, num_heads=2, num_layers=2, ffn_dim=128, text_dim=16, text_len=4)


def _mp4(path: Path, frames: int, w: int = 16, h: int = 16) -> Path:
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=8, macro_block_size=1)
    writer.send(None)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.send(rng.integers(0, 255, (h, w, 3), dtype=np.uint8).tobytes())
    writer.close()
    return path


def test_recipe_composes_with_the_release_settings():
    cfg = compose_run(["recipe=flashvsr_v1_1_x4", "control.video=clip.mp4"])
    m = cfg.model
    assert (m.dim, m.num_layers, m.in_dim, m.text_dim, m.text_len, m.lr_layers) == (
        1536, 30, 16, 4096, 512, 1)  # fmt: skip
    assert list(cfg.scheduler.timesteps) == [1000]
    assert (cfg.cache.window_frames, cfg.cache.sink_frames, cfg.rollout.frames_per_block) == (
        8, 0, 2)  # fmt: skip
    assert cfg.rollout.first_block_frames == 6  # the release's first DiT call
    assert cfg.control.checkpoint.endswith("LQ_proj_in.ckpt") and cfg.control.scale == 4.0
    # sized from the input (multiples of vsr.size_multiple = 128), decoded by the Wan VAE + adain
    assert (cfg.rollout.height, cfg.rollout.width, cfg.rollout.total_blocks) == (None, None, None)
    assert (cfg.vsr.size_multiple, cfg.vae.method, cfg.vsr.sparse_ratio) == (128, "adain", None)
    assert cfg.vae.decoder.checkpoint.endswith("Wan2.1_VAE.pth")
    tiny = compose_run(["recipe=flashvsr_v1_1_tiny", "input=clip.mp4", "vsr.scale=2",
                        "vsr.sparse_ratio=1.5", "vsr.color_fix=wavelet"])  # fmt: skip
    assert tiny.vae.decoder.checkpoint.endswith("TCDecoder.ckpt") and tiny.control.scale == 2
    assert (tiny.model.sparse_ratio, tiny.vae.method, tiny.control.video) == (1.5, "wavelet",
                                                                             "clip.mp4")  # fmt: skip


def _tiny_vsr(tmp_path: Path) -> list[str]:
    """Overrides of a tiny FlashVSR run on CPU: a 2-layer DiT and a small LR projector with random
    weights, and a random prompt tensor (written under ``tmp_path``)."""
    prompt = tmp_path / "posi_prompt.pth"
    torch.save(torch.randn(1, 4, 16), prompt)
    return ["model.checkpoint=null", "model.dim=64", "model.num_heads=2", "model.num_layers=2",
            "model.ffn_dim=128", "model.text_dim=16", "model.text_len=4",
            f"text_encoder.path={prompt}", "control.checkpoint=null", "control.hidden_dim1=8",
            "control.hidden_dim2=8", "control.dtype=float32", "graph=eager", "attention=sdpa",
            "device=cpu", "dtype=float32"]  # fmt: skip


def _run_cli(args: list[str]) -> None:
    """``flashdreams-run args`` in a subprocess (offline); it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("size,sparse", [(64, []), (128, ["model.sparse_ratio=2.0",
                                                             "model.local_range=11"])])  # fmt: skip
def test_tiny_4x_run_through_the_cli(tmp_path, size, sparse):
    video = _mp4(tmp_path / "lr.mp4", 29, w=size // 4, h=size // 4)  # 33 LR frames: 8 latents
    args = ["recipe=flashvsr_v1_1_x4", *_tiny_vsr(tmp_path), f"control.video={video}",
            "vae=preview", f"rollout.height={size}", f"rollout.width={size}",
            "rollout.total_blocks=2", *sparse, f"paths.root={tmp_path / 'out'}"]  # fmt: skip
    _run_cli(args)
    (run,) = (tmp_path / "out" / "runs").glob("*/*")
    steps = json.loads((run / "stats.json").read_text())["steps"]
    assert [s["latent_frames"] for s in steps] == [6, 2]  # the release's 6, then 2
    assert 0 < steps[-1]["projector_ms"] <= steps[-1]["diffuse_ms"]
    if sparse:
        return
    # 7 blocks need 6 + 6 x 2 = 18 latent frames = 73 LR frames: a one-line error at build
    cfg = compose_run([a for a in args if not a.startswith("paths.")] + ["rollout.total_blocks=7"])
    with pytest.raises(ConfigError) as err:
        build_conditioning(cfg, torch.device("cpu"))
    assert "\n" not in str(err.value) and "rollout.total_blocks" in str(err.value)


def test_missing_or_unreadable_video_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="input= is required"):
        LRVideoControl(video=None, hidden_dim1=8, hidden_dim2=8, dim=64)
    with pytest.raises(ConfigError, match="no such file"):
        LRVideoControl(video=tmp_path / "nope.mp4", hidden_dim1=8, hidden_dim2=8,
                       dim=64).check_frames(2)  # fmt: skip
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ConfigError) as err:
        LRVideoControl(video=bad, hidden_dim1=8, hidden_dim2=8, dim=64).check_frames(2)
    assert "\n" not in str(err.value) and "bad.mp4" in str(err.value)


def test_control_features_are_the_projector_of_the_upscaled_frames(tmp_path):
    video = _mp4(tmp_path / "lr.mp4", 21, w=16, h=8)
    ctl = LRVideoControl(video=video, hidden_dim1=8, hidden_dim2=8, dim=64, dtype="float32")
    ctl.prepare(2, height=32, width=64, num_frames=6, device=torch.device("cpu"))
    lr = ctl.lr_frames(range(25))  # 21 frames + 4 copies of the last one, 4x upscaled
    assert lr.shape == (2, 3, 25, 32, 64) and lr.min() >= -1 and lr.max() <= 1
    torch.testing.assert_close(lr[:, :, 21:], lr[:, :, 20:21].expand(-1, -1, 4, -1, -1))
    got = ctl.inputs(2, 2)["lr_features"]
    assert got.shape == (2, 1, 2 * (32 // 16) * (64 // 16), 64)
    torch.testing.assert_close(got, ctl.projector.stream(lr, 2, 2), rtol=0, atol=0)


def test_checkpoints_in_the_release_formats_load(tmp_path):
    from flashdreams.io.checkpoint import read_state_dict

    model = FlashVSRDiT(**TINY)
    model.init_weights(torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "blocks.0.self_attn.q.weight" in state and "head.head.weight" in state
    path = tmp_path / "diffusion_pytorch_model_streaming_dmd.safetensors"
    save_file(state, str(path))
    loaded = read_state_dict(str(path), FlashVSRDiT.convert_checkpoint)
    assert set(loaded) == set(state)
    fresh = FlashVSRDiT(**TINY)
    fresh.load_state_dict(loaded, strict=True)
    torch.testing.assert_close(fresh.blocks[1].ffn[0].weight, model.blocks[1].ffn[0].weight)

    proj = LRProjector(3, 64, 1, 8, 8)
    ckpt = tmp_path / "LQ_proj_in.ckpt"
    torch.save({k: torch.randn_like(v) for k, v in proj.state_dict().items()}, ckpt)
    ctl = LRVideoControl(video="x.mp4", checkpoint=str(ckpt), hidden_dim1=8, hidden_dim2=8,
                         dim=64, dtype="float32")  # fmt: skip
    torch.testing.assert_close(ctl.projector.conv1.weight, torch.load(ckpt)["conv1.weight"])
    with pytest.raises(ConfigError, match="control.checkpoint="):
        LRVideoControl(video="x.mp4", checkpoint=str(ckpt), hidden_dim1=16, hidden_dim2=8, dim=64)

    prompt = tmp_path / "posi_prompt.pth"
    torch.save(torch.randn(1, 512, 16), prompt)
    enc = PromptTensorTextEncoder(str(prompt))
    assert (enc.text_len, enc.text_dim) == (512, 16)
    assert enc.encode(["a", "b"], torch.device("cpu"), torch.float32).shape == (2, 512, 16)


def test_full_recipe_runs_through_the_cli_with_the_wan_vae_and_colour_fix(tmp_path):
    """``flashvsr_v1_1_full`` end to end on CPU (tiny DiT and projector; the Wan 2.1 VAE decoder
    at its real width, random weights): 29 LR frames at 16x16 become 29 frames at 64x64, each
    chunk's stats split the diffuse stage into projector and DiT, and the AdaIN colour fix
    holds every output frame's channel means to the LR frame's (random decoder weights give
    arbitrary colours otherwise; 4 / 255 covers the two H.264 round trips)."""
    video = _mp4(tmp_path / "lr.mp4", 29, w=16, h=16)
    args = ["recipe=flashvsr_v1_1_full", *_tiny_vsr(tmp_path), f"input={video}",
            "vae.decoder.checkpoint=null", "vsr.size_multiple=16", "rollout.total_blocks=2",
            f"paths.root={tmp_path / 'out'}"]  # fmt: skip
    _run_cli(args)
    (run,) = (tmp_path / "out" / "runs").glob("*/*")
    out, lr = read_video(run / "video.mp4")[0], read_video(video)[0]
    assert out.shape == (29, 64, 64, 3) and lr.shape == (29, 16, 16, 3)
    means = [x.reshape(29, -1, 3).astype(np.float64).mean(1) for x in (out, lr)]
    assert np.abs(means[0] - means[1]).max() <= 4.0
    steps = json.loads((run / "stats.json").read_text())["steps"]
    assert [s["latent_frames"] for s in steps] == [6, 2]
    for s in steps:
        assert s["projector_ms"] > 0 and s["dit_ms"] > 0 and s["decode_ms"] > 0
        assert s["dit_ms"] == pytest.approx(s["diffuse_ms"] - s["projector_ms"])
