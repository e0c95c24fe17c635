"""Cosmos-Predict2.5 on the GPU (CUDA only): every graph policy, attention backend and
precision=fp8 reproduce eager SDPA on a block-causal AR rollout of a small Cosmos DiT, and the
2B-shaped DiT in bf16 matches diffusers' CosmosTransformer3DModel with the same weights.

Tolerances (bf16): relative L2 error of every block's latents <= 2e-2 against eager (fp8:
<= 1e-1); the 2B forward <= 2e-2 against diffusers.
"""

import pytest
import torch

from tests.gpu.helpers import pre_captured_latents, rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BASE = [
    "recipe=cosmos_predict2_5_2b_distilled_t2v", "model.checkpoint=null", "text_encoder=random",
    "vae=none", "~vae.checkpoint", "~vae.chunk_frames", "model.dim=512", "model.num_heads=4", "model.num_layers=4",
    "model.ffn_dim=2048", "cache=rolling", "cache.window_frames=6", "cache.sink_frames=3",
    "rollout.height=256", "rollout.width=256", "rollout.frames_per_block=3",
    "rollout.total_blocks=5", "device=cuda", "dtype=bfloat16",
]  # fmt: skip


def _latents(overrides):
    return pre_captured_latents(BASE + overrides)


@pytest.fixture(scope="module")
def eager():
    return _latents(["graph=eager", "attention=sdpa"])


@pytest.mark.parametrize(
    "overrides,tol",
    [
        (["graph=cuda_graph", "attention=sdpa"], 2e-2),
        (["graph=compile", "attention=sdpa"], 2e-2),
        (["graph=compile_cuda_graph", "attention=sdpa_cudnn"], 2e-2),
        (["graph=eager", "attention=sdpa_flash"], 2e-2),
        (["graph=compile_cuda_graph", "attention=sdpa_cudnn", "precision=fp8"], 1e-1),
    ],
)
def test_policy_matches_eager(eager, overrides, tol):
    got = _latents(overrides)
    for block, (a, b) in enumerate(zip(got, eager, strict=True)):
        assert rel_l2(a, b) <= tol, f"block {block}: relative error {rel_l2(a, b):.3g}"


def test_2b_dit_matches_diffusers_bf16():
    from diffusers import CosmosTransformer3DModel

    from flashdreams.io.checkpoint import materialize
    from flashdreams.io.cosmos_keymap import flashdreams_to_diffusers
    from flashdreams.model.cosmos import CosmosDiT
    from tests.parity.test_cosmos_dit import _nearest_resize_shim

    class _Patch:  # pytest's monkeypatch is function-scoped; this test restores nothing
        def setattr(self, obj, name, value, raising=False):
            setattr(obj, name, value)

    _nearest_resize_shim(_Patch())
    with torch.device("meta"):
        ours = CosmosDiT(qk_eps=1e-5)
    ours = materialize(ours, None, "cuda", torch.bfloat16, seed=0)
    peer = CosmosTransformer3DModel(
        in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128,
        num_layers=28, text_embed_dim=1024, adaln_lora_dim=256, rope_scale=(1.0, 3.0, 3.0),
        extra_pos_embed_type=None, use_crossattn_projection=True,
        crossattn_proj_in_channels=100352, encoder_hidden_states_channels=1024,
    )  # fmt: skip
    peer.load_state_dict(flashdreams_to_diffusers(ours.state_dict()), strict=True)
    peer = peer.to("cuda", torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 4, 44, 80, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, 100352, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        want = peer(hidden_states=x, timestep=torch.tensor([0.7], device="cuda"),
                    encoder_hidden_states=text, condition_mask=torch.zeros_like(x[:, :1]),
                    padding_mask=torch.zeros(1, 1, 352, 640, device="cuda", dtype=x.dtype),
                    return_dict=False)[0]  # fmt: skip
        got = ours(x, torch.tensor([700.0], device="cuda"), ours.prepare_context(text))
    assert rel_l2(got, want) <= 2e-2
