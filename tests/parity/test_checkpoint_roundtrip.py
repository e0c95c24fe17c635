"""Checkpoint formats round-trip through ``materialize`` into a tiny WanDiT.

The reference for the key map is diffusers' own ``WanTransformer3DModel``: a diffusers folder
is written by that class from our weights (strict load), then read back.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from flashdreams.io.checkpoint import CheckpointError, materialize, read_state_dict, resolve_path
from flashdreams.io.keymap import diffusers_to_wan, wan_to_diffusers
from flashdreams.model.wan import WanDiT

TINY = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, text_len=16)


def diffusers_config(image_dim: int | None = None, **overrides) -> dict:
    """The diffusers config matching ``WanDiT(**TINY, image_dim=image_dim)``."""
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 64,
    )
    cfg.update(overrides)
    return cfg


def meta_model(**overrides) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """Random weights of the tiny model (fp32, CPU), non-trivial biases and norms included."""
    model = materialize(meta_model(), None, "cpu", torch.float32, seed=3)
    gen = torch.Generator().manual_seed(7)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()
    }


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


def write_wan_single(tmp_path, sd):
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    return str(tmp_path)


def write_wan_sharded(tmp_path, sd):
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: sd[k] for k in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(tmp_path)


def write_diffusers(tmp_path, sd, subfolder: str = "", max_shard_size: str = "10GB"):
    model = WanTransformer3DModel(**diffusers_config())
    model.load_state_dict(wan_to_diffusers(sd), strict=True)
    model.save_pretrained(tmp_path / subfolder, max_shard_size=max_shard_size)
    return str(tmp_path)


def write_self_forcing(tmp_path, sd):
    ema = {f"model.{k}": v.float() for k, v in sd.items()}
    noise = {f"model.{k}": torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": noise, "generator_ema": ema, "critic": noise, "step": 10}, path)
    return str(path)


WRITERS = {
    "wan_single": write_wan_single,
    "wan_single_file": lambda p, sd: (
        write_wan_single(p, sd) + "/diffusion_pytorch_model.safetensors"
    ),
    "wan_sharded": write_wan_sharded,
    "wan_index_file": lambda p, sd: (
        write_wan_sharded(p, sd) + "/diffusion_pytorch_model.safetensors.index.json"
    ),
    "diffusers": write_diffusers,
    "diffusers_sharded": lambda p, sd: write_diffusers(p, sd, max_shard_size="100KB"),
    "diffusers_pipeline": lambda p, sd: write_diffusers(p, sd, subfolder="transformer"),
    "self_forcing_pt": write_self_forcing,
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_roundtrip_fp32(fmt, tmp_path, source):
    spec = WRITERS[fmt](tmp_path, source)
    model = materialize(meta_model(), spec, "cpu", torch.float32, seed=0)
    assert_same(model.state_dict(), source)
    assert not any(t.is_meta for t in model.parameters())


@pytest.mark.parametrize("fmt", ["wan_sharded", "self_forcing_pt"])
def test_roundtrip_bf16_policy(fmt, tmp_path, source):
    spec = WRITERS[fmt](tmp_path, source)
    model = materialize(meta_model(), spec, "cpu", "bfloat16", seed=0)
    keep = WanDiT._keep_fp32
    expected = {
        k: v.float() if any(part in k for part in keep) else v.bfloat16() for k, v in source.items()
    }
    assert_same(model.state_dict(), expected)
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16


def test_diffusers_sharded_really_sharded(tmp_path, source):
    write_diffusers(tmp_path, source, max_shard_size="100KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert_same(read_state_dict(tmp_path), source)


def test_random_init_seeded_and_cast():
    first = materialize(meta_model(), None, "cpu", torch.bfloat16, seed=5).state_dict()
    again = materialize(meta_model(), None, "cpu", torch.bfloat16, seed=5).state_dict()
    other = materialize(meta_model(), None, "cpu", torch.bfloat16, seed=6).state_dict()
    assert_same(again, first)
    assert not torch.equal(first["blocks.0.ffn.0.weight"], other["blocks.0.ffn.0.weight"])
    assert first["blocks.0.ffn.0.weight"].dtype == torch.bfloat16
    assert first["blocks.0.modulation"].dtype == torch.float32
    full = materialize(meta_model(), None, "cpu", torch.float32, seed=5).state_dict()
    for name, tensor in first.items():  # drawn in fp32, cast straight into the final dtype
        assert torch.equal(tensor, full[name].to(tensor.dtype)), name


def test_mismatch_lists_keys(tmp_path, source):
    broken = dict(source)
    del broken["blocks.1.ffn.2.bias"]
    broken["blocks.0.extra.weight"] = torch.zeros(3)
    broken["blocks.0.ffn.0.weight"] = torch.zeros(256, 64)
    spec = write_wan_single(tmp_path, broken)
    with pytest.raises(CheckpointError) as info:
        materialize(meta_model(), spec, "cpu", torch.float32)
    msg = str(info.value)
    assert spec in msg
    assert "missing (1):" in msg and "blocks.1.ffn.2.bias" in msg
    assert "unexpected (1):" in msg and "blocks.0.extra.weight" in msg
    assert "wrong shape (1):" in msg and "(256, 64)" in msg and "(128, 64)" in msg


def test_mismatch_truncates_long_lists(tmp_path, source):
    spec = write_wan_single(tmp_path, source)
    with pytest.raises(CheckpointError) as info:
        materialize(meta_model(num_layers=4), spec, "cpu", torch.float32)
    msg = str(info.value)
    assert "missing (" in msg and "more" in msg
    assert len(msg.splitlines()) < 20


def test_corrupt_file_is_checkpoint_error(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        materialize(meta_model(), str(path), "cpu", torch.float32)


def test_missing_local_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        materialize(meta_model(), str(tmp_path / "nope.pt"), "cpu", torch.float32)


@pytest.mark.parametrize(
    "spec",
    ["hf://flashdreams-test/no-such-repo/diffusion_pytorch_model.safetensors", "hf://a/b"],
)
def test_hf_offline_not_cached(spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        materialize(meta_model(), spec, "cpu", torch.float32)
    msg = str(info.value)
    assert spec in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg


def test_hf_spec_parsing(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)

    def fake_file(repo_id, filename, **kw):
        calls.append(("file", repo_id, filename, kw["revision"]))
        return str(tmp_path / filename)

    def fake_snapshot(repo_id, **kw):
        calls.append(("snapshot", repo_id, kw["allow_patterns"], kw["revision"]))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_path("hf://org/repo@v1/ckpt/sf.pt") == tmp_path / "ckpt/sf.pt"
    assert resolve_path("hf://org/repo/google/umt5-xxl") == tmp_path / "google/umt5-xxl"
    assert resolve_path("hf://org/repo", allow_patterns=["x*"]) == tmp_path
    assert calls == [
        ("file", "org/repo", "ckpt/sf.pt", "v1"),
        ("snapshot", "org/repo", ["google/umt5-xxl/*"], None),
        ("snapshot", "org/repo", ["x*"], None),
    ]


@pytest.mark.parametrize("image_dim", [None, 48])
def test_keymap_matches_diffusers_one_to_one(image_dim):
    with torch.device("meta"):
        ours = WanDiT(**TINY, image_dim=image_dim).state_dict()
        theirs = WanTransformer3DModel(**diffusers_config(image_dim)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    their_shapes = {k: tuple(v.shape) for k, v in theirs.items()}
    forward = {k: tuple(v.shape) for k, v in wan_to_diffusers(ours).items()}
    backward = {k: tuple(v.shape) for k, v in diffusers_to_wan(theirs).items()}
    assert forward == their_shapes
    assert backward == shapes
    assert len(ours) == len(theirs)


# ---------------------------------------------------------------- envelope entry (issue 30)
def write_envelope(tmp_path, generator, ema) -> str:
    path = tmp_path / "causal_forcing.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in generator.items()},
                "generator_ema": {f"model.{k}": v for k, v in ema.items()},
                "critic": {"w": torch.zeros(1)}, "step": 10}, path)  # fmt: skip
    return str(path)


@pytest.fixture()
def two_entries(tmp_path, source):
    ema = {k: v + 0.5 for k, v in source.items()}  # different weights under each entry
    return write_envelope(tmp_path, source, ema), source, ema


@pytest.mark.parametrize("key", ["generator", "generator_ema", None])
def test_checkpoint_key_picks_the_envelope_entry(two_entries, key, caplog):
    path, generator, ema = two_entries
    with caplog.at_level("INFO", logger="flashdreams.io.checkpoint"):
        model = materialize(meta_model(), path, "cpu", torch.float32, checkpoint_key=key)
    assert_same(model.state_dict(), generator if key == "generator" else ema)  # None: ema
    loaded = "generator" if key == "generator" else "generator_ema"
    assert f"loading entry '{loaded}'" in caplog.text  # which weights ran is in the log


def test_missing_checkpoint_key_is_one_line_error(two_entries):
    path, _, _ = two_entries
    with pytest.raises(CheckpointError, match=r"^model.checkpoint_key=generator_emma but .*"
                       r"its entries: generator, generator_ema, critic\)$"):  # fmt: skip
        materialize(meta_model(), path, "cpu", torch.float32, checkpoint_key="generator_emma")


def test_recipes_load_the_entry_of_the_vendor_command():
    from tests.unit.test_config import compose_run

    expected = {  # README commands: --use_ema loads generator_ema, its absence generator
        "self_forcing_wan21_t2v_1_3b": "generator_ema",
        "self_forcing_wan21_t2v_1_3b_taehv": "generator_ema",
        "causal_forcing_wan21_t2v_1_3b_chunkwise": "generator",
        "causal_forcing_wan21_t2v_1_3b_framewise": "generator_ema",
        "causal_forcing_wan21_i2v_1_3b_framewise": "generator_ema",
    }
    for recipe, key in expected.items():
        assert compose_run([f"recipe={recipe}"]).model.checkpoint_key == key, recipe


def test_chunkwise_recipe_builds_the_generator_entry(two_entries):
    from flashdreams.build import build_model
    from tests.unit.test_config import compose_run

    path, generator, _ = two_entries
    dims = [f"model.{k}={v}" for k, v in TINY.items()]
    cfg = compose_run(["recipe=causal_forcing_wan21_t2v_1_3b_chunkwise", *dims,
                       f"model.checkpoint={path}"])  # fmt: skip
    model = build_model(cfg.model, torch.device("cpu"), torch.float32, seed=0)
    assert_same(model.state_dict(), generator)
