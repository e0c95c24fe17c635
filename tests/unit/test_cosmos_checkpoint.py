"""Loading Cosmos-Predict2.5 DiT checkpoints through the shared loader (``materialize``):
a native ``*_ema_bf16.pt`` (``net.*`` keys plus training-only entries) and a diffusers folder
(``CosmosTransformer3DModel.save_pretrained``), both tiny and random."""

from __future__ import annotations

import pytest
import torch

from flashdreams.io.checkpoint import CheckpointError, materialize
from flashdreams.io.cosmos_keymap import flashdreams_to_diffusers, flashdreams_to_native
from flashdreams.model.cosmos import CosmosDiT

TINY = dict(dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=48,
            context_dim=32, adaln_lora_dim=16, text_len=8)  # fmt: skip


def _source() -> CosmosDiT:
    model = CosmosDiT(**TINY)
    model.init_weights(torch.Generator().manual_seed(3))
    return model


def _meta() -> CosmosDiT:
    with torch.device("meta"):
        return CosmosDiT(**TINY)


def _assert_same(loaded: CosmosDiT, source: CosmosDiT, dtype: torch.dtype) -> None:
    for name, tensor in source.state_dict().items():
        got = loaded.state_dict()[name]
        keep = any(part in name for part in CosmosDiT._keep_fp32)
        assert got.dtype == (torch.float32 if keep else dtype), name
        torch.testing.assert_close(got.float(), tensor.to(dtype).float(), rtol=0, atol=0)


def test_native_pt_loads(tmp_path):
    source = _source()
    state = {k: v.to(torch.bfloat16) for k, v in flashdreams_to_native(source.state_dict()).items()}
    assert "net.x_embedder.proj.1.weight" in state and "net.t_embedding_norm.weight" in state
    state["net.accum_video_sample_counter"] = torch.tensor(7)  # training-only entries
    state["net.pos_embedder.seq"] = torch.arange(8.0)
    path = tmp_path / "d20b7120_ema_bf16.pt"
    torch.save(state, path)
    loaded = materialize(_meta(), str(path), "cpu", torch.bfloat16)
    _assert_same(loaded, source, torch.bfloat16)
    # built on the meta device, the loaded model runs (RoPE tables made on first use)
    x, ctx = torch.randn(1, 4, 2, 4, 4), loaded.prepare_context(torch.randn(1, 3, 48))
    out = loaded(x.bfloat16(), torch.tensor([500.0]), ctx)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()


def test_diffusers_folder_loads(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    source = _source()
    ref = diffusers.CosmosTransformer3DModel(
        in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=32,
        num_layers=2, text_embed_dim=32, adaln_lora_dim=16, rope_scale=(1.0, 3.0, 3.0),
        extra_pos_embed_type=None, use_crossattn_projection=True,
        crossattn_proj_in_channels=48, encoder_hidden_states_channels=32,
    )  # fmt: skip
    ref.load_state_dict(flashdreams_to_diffusers(source.state_dict()), strict=True)
    ref.save_pretrained(tmp_path / "transformer")  # a pipeline folder's transformer/
    loaded = materialize(_meta(), str(tmp_path), "cpu", torch.float32)
    _assert_same(loaded, source, torch.float32)


def test_wrong_size_checkpoint_names_the_keys(tmp_path):
    state = flashdreams_to_native(CosmosDiT(**{**TINY, "num_layers": 1}).state_dict())
    torch.save(state, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="missing .*\n.*blocks.1"):
        materialize(_meta(), str(tmp_path / "small.pt"), "cpu", torch.float32)
