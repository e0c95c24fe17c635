"""CosmosVideoConditioner: which frames it gives, at which timestep, with which mask, also for
forwards that start past frame 0 (AR blocks), and its one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flashdreams import ConfigError
from flashdreams.conditioner.cosmos_video import CosmosVideoConditioner


class _Encoder:
    """A stand-in VAE: 2 channels, 1 + (T - 1) / 4 latent frames, 8x smaller, all = the mean."""

    def encode(self, video):
        b, _, t, h, w = video.shape
        return video.mean().expand(b, 2, 1 + (t - 1) // 4, h // 8, w // 8)


def _prepared(image=None, **kw):
    cond = CosmosVideoConditioner(_Encoder(), **kw)
    cond.prepare(image, height=16, width=16, num_frames=4, device=torch.device("cpu"))
    return cond


def test_image_gives_frame_zero_at_conditional_timestep():
    cond = _prepared([Image.fromarray(np.full((16, 16, 3), 255, np.uint8))])
    assert cond.num_given == 1
    x = torch.zeros(1, 2, 4, 2, 2)
    out = cond.replace(x, 0)
    assert torch.all(out[:, :, 0] == 1.0) and torch.all(out[:, :, 1:] == 0)
    t = cond.timesteps(torch.full((1, 4), 900.0), 0)
    torch.testing.assert_close(t, torch.tensor([[0.1, 900.0, 900.0, 900.0]]))
    mask = cond.inputs(0, 4)["condition_mask"]
    assert mask.shape == (1, 1, 4, 2, 2) and mask[0, 0, :, 0, 0].tolist() == [1, 0, 0, 0]
    # a later AR block sees nothing given
    assert torch.equal(cond.replace(x, 1), x)
    assert cond.inputs(1, 2)["condition_mask"].sum() == 0


def test_text2world_gives_nothing():
    cond = _prepared()
    x = torch.randn(1, 2, 4, 2, 2)
    assert cond.num_given == 0 and torch.equal(cond.replace(x, 0), x)
    mask = cond.inputs(0, 4)["condition_mask"]  # always given: zeros
    assert mask.shape == (1, 1, 4, 2, 2) and mask.sum() == 0


def test_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="num_latent_frames=3"):
        CosmosVideoConditioner(_Encoder(), num_latent_frames=3)
    img = [Image.fromarray(np.zeros((16, 16, 3), np.uint8))]
    with pytest.raises(ConfigError, match="either image= or conditioner.video"):
        _prepared(img, video=str(tmp_path / "x.mp4"))
