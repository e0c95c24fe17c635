"""LingBot-World checkpoints: release key names, sharded safetensors + index json round trip.

The release stores the DiT under Wan original names plus its camera modules
(``patch_embedding_wancamctrl``, ``c2ws_hidden_states_layer{1,2}``,
``blocks.N.cam_injector_layer{1,2}``, ``blocks.N.cam_{scale,shift}_layer``) in
``diffusion_pytorch_model-*.safetensors`` shards with a ``.safetensors.index.json``.
"""

from __future__ import annotations

import json

import pytest
import torch

from flashdreams.build import build_model
from flashdreams.io.checkpoint import CheckpointError, materialize
from flashdreams.io.keymap import flashdreams_to_lingbot, lingbot_to_flashdreams
from flashdreams.model.wan import WanDiT
from tests.parity.test_checkpoint_roundtrip import assert_same, write_wan_sharded
from tests.unit.test_config import compose_run

TINY = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, text_len=16, in_dim=36,
            camera_channels=384)  # fmt: skip
RELEASE_CAMERA_KEYS = {
    "patch_embedding_wancamctrl.weight": (64, 1536), "patch_embedding_wancamctrl.bias": (64,),
    "c2ws_hidden_states_layer1.weight": (64, 64), "c2ws_hidden_states_layer2.bias": (64,),
    "blocks.1.cam_injector_layer1.weight": (64, 64), "blocks.0.cam_injector_layer2.bias": (64,),
    "blocks.0.cam_scale_layer.weight": (64, 64), "blocks.1.cam_shift_layer.bias": (64,),
}  # fmt: skip


def meta_model() -> WanDiT:
    with torch.device("meta"):
        return WanDiT(**TINY)


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    model = materialize(meta_model(), None, "cpu", torch.float32, seed=4)
    gen = torch.Generator().manual_seed(8)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()
    }


def write_release(tmp_path, sd) -> str:
    """A LingBot-World-style folder: release names, 2 shards + index json, config.json."""
    release = flashdreams_to_lingbot(sd)
    write_wan_sharded(tmp_path, release)
    config = {"_class_name": "WanModel", "model_type": "i2v", "control_type": "cam", "dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_release_names_of_the_camera_modules(source):
    release = flashdreams_to_lingbot(source)
    for key, shape in RELEASE_CAMERA_KEYS.items():
        assert tuple(release[key].shape) == shape, key
    assert not any("camera" in k for k in release)
    camera_keys = [k for k in release if "cam" in k or "c2ws" in k]
    assert len(camera_keys) == 6 + 2 * 4 * 2  # top level + 4 layers per block (weight, bias)
    assert lingbot_to_flashdreams(release).keys() == source.keys()


@pytest.mark.parametrize("spec", ["folder", "index"])
def test_sharded_release_round_trip(tmp_path, source, spec):
    folder = write_release(tmp_path, source)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-0000*-of-00002.safetensors"))) == 2
    path = (
        folder if spec == "folder" else f"{folder}/diffusion_pytorch_model.safetensors.index.json"
    )
    loaded = materialize(meta_model(), path, "cpu", torch.float32)
    assert_same(loaded.state_dict(), source)


def test_release_loads_through_the_model_config(tmp_path, source):
    folder = write_release(tmp_path, source)
    cfg = compose_run(["recipe=lingbot_world_fast", "model.dim=64", "model.num_heads=4",
                       "model.num_layers=2", "model.ffn_dim=128", "model.text_dim=32",
                       "model.text_len=16", f"model.checkpoint={folder}"])  # fmt: skip
    model = build_model(cfg.model, torch.device("cpu"), torch.bfloat16, seed=0)
    state = model.state_dict()
    assert state["camera_encoder.proj.weight"].dtype == torch.bfloat16
    assert state["blocks.0.modulation"].dtype == torch.float32  # fp32 policy
    torch.testing.assert_close(state["blocks.1.camera_injector.scale.weight"].float(),
                               source["blocks.1.camera_injector.scale.weight"], atol=4e-3,
                               rtol=1e-2)  # fmt: skip


def test_checkpoint_without_camera_modules_lists_them(tmp_path, source):
    plain = {k: v for k, v in source.items() if "camera" not in k}
    folder = write_release(tmp_path, plain)
    with pytest.raises(CheckpointError) as err:
        materialize(meta_model(), folder, "cpu", torch.float32)
    text = str(err.value)
    assert "missing (22)" in text and "blocks.0.camera_injector.mlp1.weight" in text


def test_real_size_architecture():
    with torch.device("meta"):
        model = WanDiT(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, in_dim=36,
                       camera_channels=384)  # fmt: skip
    release = flashdreams_to_lingbot({k: v for k, v in model.state_dict().items()})
    assert tuple(release["patch_embedding_wancamctrl.weight"].shape) == (5120, 1536)
    assert tuple(release["patch_embedding.weight"].shape) == (5120, 36, 1, 2, 2)
    assert tuple(release["blocks.39.cam_scale_layer.weight"].shape) == (5120, 5120)
    assert not any(k.startswith("img_emb") or "k_img" in k for k in release)  # no CLIP branch
    camera = sum(v.numel() for k, v in release.items() if "cam" in k or "c2ws" in k)
    total = sum(v.numel() for v in release.values())
    assert camera == 40 * 4 * (5120 * 5120 + 5120) + 1536 * 5120 + 5120 + 2 * (5120**2 + 5120)
    assert total == 18_544_332_864  # 14.29 B Wan2.1-I2V-14B without CLIP + 4.26 B camera
