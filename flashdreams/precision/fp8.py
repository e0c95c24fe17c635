"""FP8 (e4m3) linear layers with per-row scales, and the quantization they share.

Scaling (both sides "rowwise", what ``torch._scaled_mm`` calls it):
    * weights (N, K): one fp32 scale per output channel, quantized once when the layer is built;
    * activations (M, K): one fp32 scale per token, computed on the fly in the forward.

``quantize_rowwise`` is plain torch ops (abs, amax, divide, clamp, cast), so when a graph
policy compiles the block regions Inductor fuses it into the op that produced the activation
(the modulated LayerNorm, the GELU, ...). The matmul is ``torch._scaled_mm`` with rowwise
scales and the model's dtype as output (bf16 on GPUs); ``reference_scaled_mm`` is the same
math written as a dequantized fp32 matmul, used on devices without FP8 GEMMs (tests, CPU
emulation) and as the reference the kernel is checked against.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.precision.base import Precision

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
_EPS = 1e-12  # floor of a row's amax: an all-zero row gets a tiny scale, not a division by 0


def fp8_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` runs rowwise-scaled e4m3 GEMMs.

    Needs CUDA compute capability >= 8.9, and a 16x16x16 probe GEMM must run (a build whose
    kernels lack rowwise scaling on this GPU fails the probe instead of the first forward).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False
    a = torch.ones(16, 16, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), ones, ones.t().contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        log.debug("FP8 probe GEMM failed on %s: %s", device, err)
        return False
    return True


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of ``x`` to e4m3 with one scale per row.

    Args:
        x: (..., K) tensor of any float dtype.

    Returns:
        (q, scale): q (..., K) e4m3 with ``q * scale ~= x``; scale (..., 1) fp32.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``: q (..., K) e4m3, scale (..., 1) fp32."""
    return (q.float() * scale).to(dtype)


def reference_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """What ``torch._scaled_mm`` computes with rowwise scales, as a dequantized fp32 matmul.

    Args:
        a: (M, K) e4m3; b: (K, N) e4m3; scale_a: (M, 1) fp32; scale_b: (1, N) fp32;
        bias: (N,) or None; out_dtype: dtype of the result.
    """
    out = (a.float() @ b.float()) * scale_a * scale_b
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W stored in e4m3 (per-output-channel scales), x quantized per token.

    Buffers: ``qweight`` (N, K) e4m3, row-major, so ``qweight.t()`` is the column-major (K, N)
    operand ``_scaled_mm`` wants; ``weight_scale`` (1, N) fp32. ``bias`` stays in the compute
    dtype (``_scaled_mm`` adds a bf16 bias to a bf16 output). The ``weight`` attribute is a
    0-element tensor of the compute dtype: the DiT casts a layer's input with
    ``layer.weight.dtype``, which must stay bf16, not e4m3.

    Args:
        weight: (N, K) weight to quantize (its dtype is the compute dtype).
        bias: (N,) bias or None.
        backend: ``scaled_mm`` (FP8 tensor cores) or ``reference`` (dequantized fp32 matmul).
        fast_accum: ``_scaled_mm``'s ``use_fast_accum`` (Hopper: accumulate in the tensor
            cores' own precision instead of promoting partial sums to fp32 every few K-steps;
            faster, slightly less exact; what torchao's float8 inference uses).

    Attributes set after construction (``quantize_blocks``): ``act_kernel`` quantizes the input
    with the one-pass kernel ``flashdreams.precision.fp8_act.quant_act_rows`` instead of the
    torch ops Inductor fuses into the producer; ``act`` (``none``, ``gelu``, ``gelu_tanh``) is
    the activation folded into that pass (the GELU module before this linear is then gone).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str,
                 fast_accum: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.fast_accum = bool(fast_accum)
        self.act_kernel, self.act = False, "none"
        if backend not in ("scaled_mm", "reference"):
            raise ValueError(f"Fp8Linear backend {backend!r} is not scaled_mm | reference")
        self.backend = backend
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype
        qweight, scale = quantize_rowwise(weight.detach())
        self.register_buffer("qweight", qweight.contiguous())  # (N, K) e4m3
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, N) fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        probe = torch.empty(0, dtype=weight.dtype, device=weight.device)
        self.register_buffer("dtype_probe", probe, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """0-element tensor carrying the compute dtype (the real weight is ``qweight``)."""
        return self.dtype_probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.act_kernel:
            from flashdreams.precision.fp8_act import quant_act_rows

            xq, x_scale = quant_act_rows(x.reshape(-1, self.in_features), self.act)
        else:
            xq, x_scale = quantize_rowwise(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
        out_dtype = self.compute_dtype
        if self.backend == "reference":
            out = reference_scaled_mm(xq, self.qweight.t(), x_scale, self.weight_scale,
                                      self.bias, out_dtype)  # fmt: skip
        else:
            fused_bias = self.bias is not None and out_dtype != torch.float32
            out = torch._scaled_mm(
                xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                bias=self.bias if fused_bias else None, out_dtype=out_dtype,
                use_fast_accum=self.fast_accum,
            )  # fmt: skip
            if self.bias is not None and not fused_bias:
                out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        accum = ", fast_accum" if self.fast_accum and self.backend == "scaled_mm" else ""
        quant = f", act_kernel({self.act})" if self.act_kernel else ""
        return (f"in={self.in_features}, out={self.out_features}, backend={self.backend}"
                f"{accum}{quant}")  # fmt: skip


def quantizable(layer: nn.Linear) -> bool:
    """``_scaled_mm`` needs K and N to be multiples of 16."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def to_fp8(layer: nn.Linear, backend: str, fast_accum: bool = True) -> nn.Module:
    """An ``Fp8Linear`` replacing ``layer`` (or ``layer`` itself when its dims do not fit)."""
    if not quantizable(layer):
        return layer
    return Fp8Linear(layer.weight, layer.bias, backend, fast_accum)


class Fp8RowSlice(nn.Module):
    """q, k or v after fusion: rows [start, stop) of the fused QKV ``Fp8Linear``.

    Holds no weights (the fused layer owns them, so offloading and memory see them once); the
    DiT reads only its ``weight.dtype`` and projects through the fused layer. Calling it runs
    the fused GEMM and slices (correct, 3x the work; nothing in the DiT does).
    """

    def __init__(self, fused: Fp8Linear, start: int, stop: int) -> None:
        super().__init__()
        self._fused = (fused,)  # a tuple: the fused layer is registered once, on the attention
        self.start, self.stop = start, stop
        self.in_features, self.out_features = fused.in_features, stop - start
        self.register_buffer("dtype_probe", torch.empty_like(fused.weight), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """0-element tensor of the compute dtype (its own: compiled regions read it directly)."""
        return self.dtype_probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0](x)[..., self.start : self.stop]


def _fuse_qkv_fp8(attn: nn.Module, backend: str, fast_accum: bool = True,
                  min_out_features: int = 0) -> bool:  # fmt: skip
    """Install one fused e4m3 QKV projection on a self-attention: a module with a ``qkv`` slot
    and q/k/v ``nn.Linear``s named by its ``qkv_names`` (default ``q``, ``k``, ``v``), all with
    biases or all without, of one input width."""
    names = getattr(attn, "qkv_names", ("q", "k", "v"))
    layers = [getattr(attn, name, None) for name in names]
    if not hasattr(attn, "qkv") or not all(isinstance(x, nn.Linear) for x in layers):
        return False
    if not all(quantizable(x) for x in layers) or len({x.in_features for x in layers}) != 1:
        return False
    biased = {x.bias is not None for x in layers}
    if len(biased) != 1:
        return False
    if sum(x.out_features for x in layers) < min_out_features:
        return False
    weight = torch.cat([x.weight for x in layers])  # (3N, K): per-row scales fuse exactly
    bias = torch.cat([x.bias for x in layers]) if biased == {True} else None
    fused = Fp8Linear(weight, bias, backend, fast_accum)
    del weight
    attn.qkv_weight = attn.qkv_bias = None  # a bf16 fusion (compile) is superseded
    attn.qkv = fused
    start = 0
    for name, layer in zip(names, layers, strict=True):
        setattr(attn, name, Fp8RowSlice(fused, start, start + layer.out_features))
        start += layer.out_features
    return True


def _blocks(model: nn.Module):
    """The transformer blocks of ``model`` and of its sub-DiTs (experts): every ``blocks``
    ``nn.ModuleList`` inside it."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]
    return (b for owner in owners for b in owner.blocks)


def _act_chains(module: nn.Module) -> list[tuple[str, str, str]]:
    """(linear, activation, linear) child names that ``module`` applies in that order: the
    consecutive children of an ``nn.Sequential``, or what a module declares as ``act_chain``."""
    if isinstance(module, nn.Sequential):
        names = [n for n, _ in module.named_children()]
        return [tuple(names[i : i + 3]) for i in range(len(names) - 2)]
    chain = getattr(module, "act_chain", None)
    return [tuple(chain)] if chain else []


def fold_activations(model: nn.Module, every: bool = True) -> int:
    """A GELU between two linears inside ``blocks`` (an FFN) moves into the second one's input
    quantization, a one-pass kernel (the GELU module becomes ``nn.Identity``); with ``every``,
    every other ``Fp8Linear`` of the blocks quantizes its input with that kernel too. Returns
    how many GELUs moved."""
    folded = 0
    for block in _blocks(model):
        for module in block.modules():
            if isinstance(module, Fp8Linear) and every:
                module.act_kernel = True
            for first, act, second in _act_chains(module):
                a, g, b = (getattr(module, n, None) for n in (first, act, second))
                if isinstance(g, nn.GELU) and isinstance(b, Fp8Linear) and b.act == "none" \
                        and isinstance(a, (nn.Linear, Fp8Linear)):  # fmt: skip
                    b.act = "gelu_tanh" if g.approximate == "tanh" else "gelu"
                    b.act_kernel = True
                    setattr(module, act, nn.Identity())
                    folded += 1
    return folded


def quantize_blocks(model: nn.Module, backend: str, fast_accum: bool = True,
                    min_out_features: int = 0) -> int:  # fmt: skip
    """Swap every ``nn.Linear`` inside ``blocks`` (of ``model`` or its sub-DiTs) for e4m3 ones.

    Self-attention q/k/v become one fused QKV GEMM. Everything outside the blocks (patch,
    text and time embeddings, time projection, head) and every norm and modulation table
    stays in its dtype. Each bf16 weight is freed as soon as its e4m3 copy exists.

    ``min_out_features``: linears with fewer outputs (the fused QKV counts its 3 x dim) stay in
    bf16. A narrow GEMM saves less time in FP8 than quantizing its input per token costs.

    Returns:
        How many linears were swapped (the fused QKV counts as three).
    """
    count = 0
    for block in _blocks(model):  # several DiTs (experts) too
        for _, module in list(block.named_modules()):
            if _fuse_qkv_fp8(module, backend, fast_accum, min_out_features):
                count += 3
            for child_name, child in list(module.named_children()):
                wide = getattr(child, "out_features", 0) >= min_out_features
                if type(child) is nn.Linear and quantizable(child) and wide:
                    setattr(module, child_name, to_fp8(child, backend, fast_accum))
                    count += 1
    return count


class Fp8Precision(Precision):
    """``precision=fp8``: e4m3 GEMMs in the transformer blocks, bf16 everywhere else.

    Falls back to the unchanged model on devices without FP8 GEMMs (CPU, CUDA compute
    capability < 8.9), logging one line. ``emulate=true`` instead runs the e4m3 math with the
    dequantized reference matmul on any device (slow; for CPU tests and quality checks).

    Args:
        kv_cache: ``null`` or ``fp8`` (see :class:`flashdreams.precision.base.Precision`).
        tf32: fp32 matmuls on TF32 tensor cores (see the base class).
        emulate: quantize even without FP8 GEMMs, computing with ``reference_scaled_mm``.
        fast_accum: ``use_fast_accum`` of the FP8 GEMMs (see :class:`Fp8Linear`).
        min_out_features: block linears with fewer outputs stay bf16 (``quantize_blocks``).
        act_quant: ``inductor`` (the per-token quantization as torch ops, fused by Inductor
            into the op producing the input), ``ffn`` (the FFN's GELU and the second linear's
            quantization as one Triton pass: ``fold_activations``; the others as ``inductor``)
            or ``kernel`` (every block linear's input through that pass). Off CUDA the pass
            runs the same torch ops.
    """

    name = "fp8"

    def __init__(self, kv_cache: str | None = None, emulate: bool = False,
                 fast_accum: bool = True, min_out_features: int = 0,
                 tf32: bool = False, act_quant: str = "inductor") -> None:  # fmt: skip
        super().__init__(kv_cache, tf32)
        if act_quant not in ("inductor", "ffn", "kernel"):
            raise ConfigError(f"precision.act_quant={act_quant!r} must be inductor, ffn or kernel")
        self.act_quant = act_quant
        self.emulate = emulate
        self.fast_accum = bool(fast_accum)
        self.min_out_features = int(min_out_features)

    def apply(self, model: nn.Module, device: torch.device) -> nn.Module:
        self.set_matmul_precision()
        if fp8_supported(device):
            backend = "scaled_mm"
        elif self.emulate:
            backend = "reference"
        else:
            dtype = next(model.parameters()).dtype
            log.warning("precision=fp8: %s has no FP8 GEMMs (needs CUDA compute capability "
                        ">= 8.9 and rowwise _scaled_mm); keeping %s linears", _device_name(device),
                        str(dtype).removeprefix("torch."))  # fmt: skip
            self.effective = f"{str(dtype).removeprefix('torch.')} (fp8 unavailable)"
            return model
        count = quantize_blocks(model, backend, self.fast_accum, self.min_out_features)
        folded = 0
        if self.act_quant != "inductor":
            folded = fold_activations(model, every=self.act_quant == "kernel")
        log.info("precision=fp8: %d block linears in e4m3 (%s%s%s)", count, backend,
                 ", fast accumulation" if self.fast_accum and backend == "scaled_mm" else "",
                 f", act_quant={self.act_quant}: {folded} GELUs folded into the quantize pass"
                 if self.act_quant != "inductor" else "")  # fmt: skip
        self.effective = f"fp8 ({backend})"
        return model


def _device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return device.type
