"""The run policies shared with Wan apply to CosmosDiT: the compile policy's block preparation
(q/k/v fused into one GEMM, the attention-free regions compiled) and precision=fp8's block
quantization (the per-frame AdaLN-LoRA modulation stays in its dtype)."""

from __future__ import annotations

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.graph.compile import compile_blocks
from flashdreams.model.cosmos import CosmosDiT
from flashdreams.model.cosmos.dit import _ModLinear
from flashdreams.precision.fp8 import Fp8Linear, quantize_blocks

TINY = dict(dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=48,
            context_dim=32, adaln_lora_dim=16, text_len=8)  # fmt: skip


def _model() -> CosmosDiT:
    model = CosmosDiT(**TINY)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)


def _run(model: CosmosDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    ctx = model.prepare_context(torch.randn(1, 5, 48, generator=g))
    return model(x, torch.tensor([[700.0, 0.1]]), ctx)


def test_compile_policy_prepares_regions(monkeypatch):
    model = _model()
    ref = _run(model)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    compile_blocks(model, "default", False)
    assert len(compiled) == 3 * TINY["num_layers"]  # every region of every block
    assert all(b.self_attn.qkv_weight is not None for b in model.blocks)
    torch.testing.assert_close(_run(model), ref, rtol=0, atol=1e-5)


def test_fp8_quantizes_block_linears_not_modulation():
    model = _model()
    ref = _run(model)
    count = quantize_blocks(model, "reference")
    blocks = list(model.blocks)
    assert count == 10 * len(blocks)  # q/k/v/o of both attentions + the MLP's two
    assert all(type(b.mlp.layer1) is Fp8Linear for b in blocks)
    assert all(type(b.adaln_modulation_mlp[2]) is _ModLinear for b in blocks)
    out = _run(model)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_bench_floor_counts_the_cosmos_block_gemms():
    """The model's FLOP count (``DiT.forward_flops``, what flashdreams-bench's floor charges)
    equals the 2B model's block GEMMs: per token, plus the AdaLN-LoRA modulation per latent
    frame (cross-attention K/V are per prompt, not per forward)."""
    from tests.unit.test_config import compose_run

    cfg = compose_run(["model=cosmos_predict2_5_2b"])
    with torch.device("meta"):
        model = CosmosDiT(
            **{k: v for k, v in cfg.model.items() if k not in ("_target_", "checkpoint")}
        )
    per_token = per_frame = 0
    for name, m in model.blocks.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith(
            ("cross_attn.k_proj", "cross_attn.v_proj")
        ):
            continue
        if "adaln" in name:
            per_frame += 2 * m.in_features * m.out_features
        else:
            per_token += 2 * m.in_features * m.out_features
    assert per_frame > 0
    flops = model.forward_flops(2000, 2000, tokens_per_frame=1000)  # two latent frames
    assert flops["linear"] == 2000 * per_token + 2 * per_frame


def test_offload_blocks_equals_resident():
    """offload=blocks streams the Cosmos blocks (their modulation and the prompt's context K/V
    included) and gives the resident model's latents bit for bit (CPU: the same code, sync)."""
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    base = ["recipe=cosmos_predict2_5_2b_distilled_t2v", "model=cosmos_tiny",
            "model.checkpoint=null", "device=cpu", "dtype=float32", "text_encoder=random",
            "vae=none", "~vae.checkpoint", "~vae.chunk_frames", "rollout.height=32", "rollout.width=32",
            "rollout.frames_per_block=2", "rollout.total_blocks=2", "cache=rolling",
            "scheduler.timesteps=[1000,500]"]  # fmt: skip
    latents = []
    for extra in ([], ["offload=blocks"]):
        rollout = build_rollout(compose_run([*base, *extra]))
        rollout.start(["a prompt"])
        latents.append([rollout.step().latents for _ in range(2)])
    assert rollout.offloader is not None and rollout.offloader.num_loads > 0
    assert all(torch.equal(a, b) for a, b in zip(*latents, strict=True))


def test_bad_model_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^model.dim=100 is not a multiple of model.num_heads"):
        CosmosDiT(**{**TINY, "dim": 100, "num_heads": 3})
    with pytest.raises(ConfigError, match=r"^model.text_dim=48 differs from model.context_dim"):
        CosmosDiT(**TINY, use_crossattn_projection=False)
    with pytest.raises(ConfigError, match=r"^model.rope_scale=\[1.0, 3.0\] needs 3 ratios"):
        CosmosDiT(**TINY, rope_scale=(1.0, 3.0))


def test_fp8_fuses_the_self_attention_qkv_not_the_cross_attention():
    """precision=fp8 gives the Cosmos self-attention one e4m3 q/k/v GEMM (no biases, as
    Wan's fused one) and the forward runs through it; the cross-attention's q stays its own."""
    model = _model()
    ref = _run(model)
    quantize_blocks(model, "reference")
    for b in model.blocks:
        assert type(b.self_attn.qkv) is Fp8Linear and b.self_attn.qkv.out_features == 3 * 64
        assert b.self_attn.qkv.bias is None and not hasattr(b.cross_attn, "qkv")
        assert type(b.cross_attn.q_proj) is Fp8Linear
    calls = []
    model.blocks[0].self_attn.qkv.register_forward_hook(lambda *a: calls.append(1))
    out = _run(model)
    assert calls == [1]
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_fp8_on_the_omnidreams_2b_blocks_with_the_recipe_threshold():
    """The 2B OmniDreams DiT (meta weights) under precision=fp8's min_out_features=3072: the
    fused QKV (6144 wide) and FFN-up (8192) become e4m3, the 2048-wide GEMMs (o, cross-attention
    q/o, FFN-down) and the HDMap patch embedding stay bf16; min_out_features=0 takes them all."""
    from flashdreams.model.omnidreams import OmniDreamsDiT
    from tests.unit.test_config import compose_run

    cfg = compose_run(["recipe=omnidreams_single_view", "precision=fp8"])
    kw = {k: v for k, v in cfg.model.items() if k not in ("_target_", "checkpoint")}
    for threshold, want in ((cfg.precision.min_out_features, 4), (0, 10)):
        with torch.device("meta"):
            model = OmniDreamsDiT(**{**kw, "num_layers": 2}).to(torch.bfloat16)
        count = quantize_blocks(model, "reference", min_out_features=threshold)
        assert count == want * 2
        b = model.blocks[0]
        assert type(b.self_attn.qkv) is Fp8Linear and b.self_attn.qkv.out_features == 6144
        assert type(b.mlp.layer1) is Fp8Linear
        fp8_rest = [type(m) is Fp8Linear for m in (b.self_attn.output_proj, b.mlp.layer2,
                                                   b.cross_attn.q_proj, b.cross_attn.output_proj)]  # fmt: skip
        assert fp8_rest == [threshold == 0] * 4
        assert type(model.additional_patch_embedding) is torch.nn.Linear
