"""Input images (I2V first frames): reading, fitting to the video size, conversion to tensors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flashdreams import ConfigError

log = logging.getLogger(__name__)


def load_image(path: str | Path, setting: str = "image") -> Image.Image:
    """Read a PNG / JPEG (any format PIL reads) as an RGB image.

    Args:
        path: the image file.
        setting: the config key named in errors.

    Raises:
        ConfigError: one line naming ``setting`` when the file is missing or not an image.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{setting}={str(path)!r}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"{setting}={str(path)!r}: cannot read it as an image ({reason})"
        ) from err


def fit_image(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (and, if the aspect ratio differs, center-crop) an image to ``width x height``.

    An image of the right size is returned unchanged. Otherwise the image is center-cropped to
    the target aspect ratio (when it differs by more than 1%) and resized with Lanczos, the
    resampling diffusers' ``VideoProcessor`` uses; a log line reports the change. Diffusers
    stretches instead of cropping, which distorts images of another aspect ratio.

    Args:
        img: an RGB image.
        height: target height in pixels.
        width: target width in pixels.
    """
    if img.size == (width, height):
        return img
    w, h = img.size
    target, source = width / height, w / h
    box = (0, 0, w, h)
    if abs(source / target - 1.0) > 0.01:
        if source > target:  # too wide: crop the sides
            cw = round(h * target)
            box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
        else:  # too tall: crop top and bottom
            ch = round(w / target)
            box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    log.info(
        "input image %dx%d resized to %dx%d%s", w, h, width, height,
        f" (center crop {box[2] - box[0]}x{box[3] - box[1]})" if box != (0, 0, w, h) else "",
    )  # fmt: skip
    return img.resize((width, height), Image.Resampling.LANCZOS, box=box)


def image_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> (B, 3, H, W) float32 in [-1, 1] (x / 255 * 2 - 1)."""
    arrays = [np.asarray(img, dtype=np.float32) / 255.0 for img in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return 2.0 * batch - 1.0
