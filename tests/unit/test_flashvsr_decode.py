"""FlashVSR decoding through the decoder contract: colour correction against a direct formula,
the TCDecoder fed its LR frames by the control chunk by chunk equal to one whole-clip decode
(the release's ``decode_video(cond=LQ_video)`` + ``ColorCorrector``), decoder checkpoints in the
release formats, and a decoder input no control gives (one line).

Tolerances: fp32 on the CPU, max abs error <= 1e-5 (observed ~1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from flashdreams import ConfigError
from flashdreams.build import feed_decoder
from flashdreams.control.base import NoControl
from flashdreams.control.lr_video import LRVideoControl
from flashdreams.model.flashvsr.tcdecoder import TCDecoder, lr_groups
from flashdreams.vae.base import FedDecoder
from flashdreams.vae.color_fix import ColorFixedDecoder, color_fix
from flashdreams.vae.preview import LatentPreviewDecoder
from tests.unit.test_flashvsr_recipe import ROOT, _mp4

SMALL = (8, 8, 4, 4)  # TCDecoder widths for tests


def _adain_direct(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per frame and channel: standardise ``x`` with its own statistics, rescale to ``ref``'s."""
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:3]):
        a, b = x[idx], ref[idx]
        sa, sb = np.sqrt(a.var() + 1e-5), np.sqrt(b.var() + 1e-5)
        out[idx] = (a - a.mean()) / sa * sb + b.mean()
    return out


def _blur_direct(img: np.ndarray, r: int) -> np.ndarray:
    """3 x 3 binomial blur of a (H, W) image, taps ``r`` pixels apart, edges replicated."""
    k = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    p = np.pad(img, r, mode="edge")
    h, w = img.shape
    return sum(k[i, j] * p[i * r : i * r + h, j * r : j * r + w]
               for i in range(3) for j in range(3))  # fmt: skip


def _wavelet_direct(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:3]):
        lo_x, lo_r = x[idx], ref[idx]
        for level in range(5):
            lo_x, lo_r = _blur_direct(lo_x, 2**level), _blur_direct(lo_r, 2**level)
        out[idx] = (x[idx] - lo_x) + lo_r  # high = x - (last low): the levels telescope
    return out


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_color_fix_matches_the_direct_formula(method):
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 3, 20, 24, generator=g)  # (B, T, 3, H, W) in [0, 1]
    ref = torch.rand(2, 3, 3, 20, 24, generator=g) * 1.6 - 0.9  # [-1, 1]
    got = color_fix(frames, ref, method)
    x, r = frames.double().numpy() * 2 - 1, ref.double().numpy()
    want = _adain_direct(x, r) if method == "adain" else _wavelet_direct(x, r)
    want = (np.clip(want, -1, 1) + 1) / 2
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    assert (got - frames).abs().max() > 1e-2  # it changed the frames
    assert color_fix(frames, ref, "none") is frames


def _control(tmp_path) -> LRVideoControl:
    video = _mp4(tmp_path / "lr.mp4", 21, w=8, h=8)  # 25 LR frames after padding: 6 latents
    ctl = LRVideoControl(video=video, hidden_dim1=8, hidden_dim2=8, dim=64, dtype="float32",
                         size_multiple=16)  # fmt: skip
    ctl.prepare(1, height=32, width=32, num_frames=6, device=torch.device("cpu"))
    return ctl


@pytest.mark.parametrize("method,chunks", [("adain", (2, 2, 2)), ("wavelet", (4, 2))])
def test_fed_tcdecoder_streams_as_its_whole_clip(tmp_path, method, chunks):
    ctl = _control(tmp_path)
    torch.manual_seed(0)
    tc = TCDecoder(channels=SMALL)
    fed = feed_decoder(ColorFixedDecoder(tc, method), ctl)
    assert isinstance(fed, FedDecoder) and fed.inputs() == {}
    latents = torch.randn(1, 16, 6, 4, 4)
    fed.reset()
    parts, s = [], 0
    for n in chunks:
        parts.append(fed.decode_step(latents[:, :, s : s + n]))
        s += n
    # the release: one decode of the clip with cond = LR frames [0, 4 n - 3) (front-padded with
    # frame 0), then output frame i corrected against LR frame i
    lr = ctl.lr_frames(range(25))  # (1, 3, 25, 32, 32)
    tc.reset()
    whole = tc.decode_full(latents, lr_groups(lr, 0, 6))  # (1, 21, 3, 32, 32)
    whole = color_fix(whole, lr[:, :, :21].transpose(1, 2), method)
    got = torch.cat(parts, dim=1)
    assert got.shape == whole.shape == (1, 21, 3, 32, 32)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
    fed.reset()  # a new clip starts at latent frame 0 again
    torch.testing.assert_close(fed.decode_step(latents[:, :, :2]), got[:, :5], rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_tcdecoder_checkpoint_in_the_release_formats_loads_through_the_vae_option(tmp_path, suffix):
    torch.manual_seed(1)
    state = {
        k: torch.randn_like(v) * 0.1 for k, v in TCDecoder(channels=SMALL).state_dict().items()
    }
    assert "decoder.26.bias" in state and state["decoder.1.weight"].shape[1] == 16 + 768
    path = tmp_path / f"TCDecoder{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    node = OmegaConf.load(ROOT / "flashdreams/conf/vae/tcdecoder.yaml")
    node.decoder.checkpoint, node.decoder.channels = str(path), list(SMALL)
    vae = instantiate(node)
    assert isinstance(vae, ColorFixedDecoder) and vae.method == "adain"
    torch.testing.assert_close(vae.decoder.decoder[24].weight, state["decoder.24.weight"])
    node.decoder.channels = [8, 8, 8, 4]
    with pytest.raises(Exception, match="TCDecoder"):
        instantiate(node)  # a file of other widths is refused, naming it


def test_decoder_inputs_must_be_given_and_methods_checked():
    with pytest.raises(ConfigError) as err:
        feed_decoder(ColorFixedDecoder(LatentPreviewDecoder()), NoControl(), "vae=tcdecoder")
    assert "\n" not in str(err.value) and "'lr_frames'" in str(err.value)
    assert feed_decoder(LatentPreviewDecoder(), NoControl()).inputs() == {}  # nothing to feed
    with pytest.raises(ConfigError, match="vsr.color_fix"):
        ColorFixedDecoder(LatentPreviewDecoder(), "histogram")
