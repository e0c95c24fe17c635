"""The one-pass FP8 input quantization (``flashdreams.precision.fp8_act``) on the GPU: the
kernel against ``quantize_rowwise(gelu(x))`` at the models' FFN and projection widths, and a
folded FFN (GELU inside the second linear's quantization) compiled against the unfolded one."""

import pytest
import torch
from torch import nn

from flashdreams.precision.fp8 import Fp8Linear, fold_activations, fp8_supported
from flashdreams.precision.fp8_act import _reference, quant_act_rows
from tests.gpu.helpers import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("cols", [2048, 3072, 8192, 8960, 14336])  # 8960: split rows
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
def test_kernel_matches_the_torch_ops(cols, act):
    g = torch.Generator(device="cuda").manual_seed(cols)
    x = torch.randn(1000, cols, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    q, scale = quant_act_rows(x, act)
    q_ref, scale_ref = _reference(x, act)
    assert q.dtype == q_ref.dtype and scale.shape == scale_ref.shape == (1000, 1)
    # the GELU may round one element to the neighbouring bf16 value: a row's amax moves by at
    # most one bf16 step (2^-8 relative); values agree to about one e4m3 step
    assert float(((scale / scale_ref) - 1).abs().max()) <= 2**-8
    assert rel_l2(q.float() * scale, q_ref.float() * scale_ref) < 2e-2
    if act == "none":  # no rounding in between: the same bits but for ties of the division
        assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported("cuda")), reason="FP8 GEMMs")
def test_folded_ffn_compiled_equals_the_unfolded_one():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(approximate="tanh"), nn.Linear(4096, 1024))
    dense = dense.cuda().to(torch.bfloat16)
    ffn = nn.Sequential(*(Fp8Linear(m.weight, m.bias, "scaled_mm") if isinstance(m, nn.Linear)
                          else m for m in dense))  # fmt: skip
    x = torch.randn(3, 700, 1024, device="cuda", dtype=torch.bfloat16)
    exact = dense(x)
    unfolded = torch.compile(ffn)(x)
    owner = nn.Module()
    owner.blocks = nn.ModuleList([ffn])
    assert fold_activations(owner) == 1 and isinstance(ffn[1], nn.Identity)
    folded = torch.compile(ffn)(x)
    # two e4m3 quantizations of one random-weight FFN: ~5 % of bf16 either way (H200: 0.0528
    # folded, 0.0528 unfolded; the two 1.4 % apart: the fused Inductor pass keeps the GELU in
    # fp32 where the kernel rounds it to bf16 as the module does); folding costs no accuracy
    err, base = rel_l2(folded, exact), rel_l2(unfolded, exact)
    assert err < 8e-2 and err < 1.1 * base, (err, base)
