"""CLIP preprocessing: ``crop`` (diffusers) and ``squash`` (the Wan reference code, Matrix-Game).

A 352x640 frame whose left and right eighths are red and the rest blue: ``squash`` keeps the red
edges (the whole frame is resized to 224x224), ``crop`` cuts them away (the center 352x352 only);
``squash`` equals the reference formula (bicubic resize of the [-1, 1] frame, back to [0, 1],
CLIP mean / std) to 1e-6, and ``frame_size`` fits an image of another size to the frame first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flashdreams import ConfigError
from flashdreams.image_encoder.clip import CLIPImageEncoder

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "projection_dim": 8}  # fmt: skip
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _frame() -> Image.Image:
    a = np.zeros((352, 640, 3), np.uint8)
    a[:, :, 2] = 255
    a[:, :80] = a[:, -80:] = (255, 0, 0)
    return Image.fromarray(a)


def _encoder(**kw) -> CLIPImageEncoder:
    return CLIPImageEncoder(checkpoint=None, processor=None, config=TINY, **kw)


def test_squash_keeps_the_whole_frame_and_crop_does_not():
    frame = _frame()
    squash = _encoder(preprocess="squash").pixels([frame])
    crop = _encoder().pixels([frame])
    assert squash.shape == crop.shape == (1, 3, 224, 224)
    red = (1.0 - MEAN[0, 0, 0, 0]) / STD[0, 0, 0, 0]  # normalized red channel of a red pixel
    assert squash[0, 0, 112, 5] == pytest.approx(float(red), abs=1e-3)  # left edge kept
    assert crop[0, 0, 112, 5] < 0  # cropped: the left edge is blue (red channel 0)
    x = torch.from_numpy(np.asarray(frame, np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    ref = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    assert torch.allclose(squash, (ref - MEAN) / STD, atol=1e-6)


def test_frame_size_fits_the_image_to_the_video_frame_first():
    big = _frame().resize((1280, 704))
    direct = _encoder(preprocess="squash").pixels([_frame()])
    fitted = _encoder(preprocess="squash", frame_size=[352, 640]).pixels([big])
    assert (fitted - direct).abs().mean() < 0.05  # the same frame up to resampling


@pytest.mark.parametrize("kw, setting", [({"preprocess": "stretch"}, "image_encoder.preprocess"),
                                         ({"frame_size": [352]}, "image_encoder.frame_size")])  # fmt: skip
def test_bad_settings_are_one_line_errors(kw, setting):
    with pytest.raises(ConfigError, match=setting):
        _encoder(**kw)
