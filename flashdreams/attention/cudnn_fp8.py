"""FP8 (e4m3) attention: the cuDNN frontend's FP8 SDPA with per-tensor scales (Hopper and newer).

Scaling (what cuDNN's FP8 forward takes, one fp32 scale per tensor):
    * Q, K, V: ``amax / 448`` each, on the device (no host sync): measured every call for Q; for
      K and V taken from the bound a KV cache with ``track_amax`` keeps (passed as the
      ``kv_amax`` argument), else measured too;
    * P (the softmax tile, in [0, 1] before normalization): a fixed scale of 448;
    * O: a convex combination of V's rows, so ``|O| <= amax(V)``: O is written in e4m3 with V's
      scale (Hopper's kernel only writes e4m3; cuDNN writes bf16 O from Blackwell on) and
      dequantized to the compute dtype.

The optional ``nvidia-cudnn-frontend`` package (``pip install nvidia-cudnn-frontend``, which uses
the cuDNN that PyTorch ships) runs the kernel. Without it, on CPU, on GPUs below sm90, for masked
calls and for short key ranges (cross-attention to text, where quantizing costs more than FP8
saves) the call goes to pinned SDPA, the first fallback of each kind logged once and every call
counted by route (``routes()``: ``fp8``, ``fallback:<reason>``, ``emulated:<reason>``). ``emulate``
runs the same e4m3 math in fp32 torch ops instead of SDPA (slow; for CPU tests and quality
checks of the scheme).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math

import torch

from flashdreams import ConfigError
from flashdreams.attention.base import AttentionBackend
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.parallel.ring_attention import merge as merge_lse
from flashdreams.precision.fp8_tensor import (
    FP8,
    FP8_MAX,
    dequantize_tensor,
    kernels,
    quantize_tensor,
    quantize_tensor_device,
)

log = logging.getLogger(__name__)


def reference_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    o_fp8: bool = True,
    q_amax: torch.Tensor | None = None,
    smooth: bool = False,
) -> torch.Tensor:
    """The FP8 scheme in fp32 torch ops on (B, L, H, D): e4m3 Q/K/V and P, per-tensor scales.

    ``o_fp8``: O rounded to e4m3 with V's scale (Hopper's kernel writes e4m3 O), else kept.
    ``q_amax``: Q's bound when ``q`` is a slice of the queries one call quantizes together.
    ``smooth``: K and V minus their means over the keys before quantizing (``kv_means``).
    Returns (B, Lq, H, D) in q's dtype. What the cuDNN kernel computes up to accumulation order;
    the emulation path and the GPU parity test use it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k_mean, v_mean = kv_means(k, v) if smooth else (None, None)
    (qq, dq), (kq, dk), (vq, dv) = (
        quantize_tensor(q, q_amax),
        quantize_tensor(k, offset=k_mean),
        quantize_tensor(v, offset=v_mean),
    )
    qf = qq.float().transpose(1, 2) * dq  # (B, H, Lq, D)
    kf = kq.float().transpose(1, 2) * dk
    vf = vq.float().transpose(1, 2) * dv
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))  # unnormalized tile values in [0, 1]
    denom = p.sum(-1, keepdim=True)
    p = (p * FP8_MAX).to(FP8).float() / FP8_MAX  # P in e4m3 at scale 448
    o = (p @ vf) / denom
    if o_fp8:
        o = (o / dv).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * dv  # e4m3 with V's scale
    o = o.transpose(1, 2)
    return (o if v_mean is None else o + v_mean).to(q.dtype)


SMOOTH_SAMPLE = 1024  # keys a smoothing mean is taken over (evenly strided through the keys)


def kv_means(k: torch.Tensor, v: torch.Tensor, sample: int = SMOOTH_SAMPLE):
    """(m_K, m_V), fp32 (1, 1, H, D): K's and V's means per head and channel over the batch
    and an evenly strided sample of at most ``sample`` keys per batch element (a read of a
    few MB, not of the whole K/V).

    Any m keeps attention exact: softmax(q.(k - m)) = softmax(q.k) (a constant per query
    row), and the rows of P sum to 1, so P (V - m) + m = P V. The quantizer takes m off inside
    its passes (``quantize_tensor_device(offset=)``, nothing written out) and O gets m_V back.
    What changes is what the FP8 kernel sees: activations share a
    large common component across tokens; without it the e4m3 scales resolve the part that
    differs, and the P.V accumulator no longer grows with the key count. Hopper's FP8 MMA keeps
    a reduced-precision accumulator (SageAttention2 reports 22 bits), so with diffuse attention
    over a V of nonzero mean the error grows with the keys: measured on the H200 with Cosmos'
    activations, kernel vs the e4m3 scheme 0.07-0.14 rel L2 at 7040 keys, 0.27-0.54 at 84480
    (random zero-mean data: the scheme's error at every length).
    """
    stride = max(1, k.shape[1] // sample)
    return tuple(x.detach()[:, ::stride].mean(dim=(0, 1), keepdim=True, dtype=torch.float32)
                 for x in (k, v))  # fmt: skip


# ----------------------------------------------------------------------------- cuDNN graphs
def find_cudnn_frontend():
    """The ``cudnn`` module of nvidia-cudnn-frontend, or None when it is not importable."""
    try:
        return importlib.import_module("cudnn")
    except (ImportError, OSError, RuntimeError, AttributeError):
        return None


_CUDNN_DTYPES = {
    torch.bfloat16: lambda cudnn: cudnn.data_type.BFLOAT16,
    torch.float16: lambda cudnn: cudnn.data_type.HALF,
}


class _Fp8Plan:
    """One built cuDNN FP8 SDPA graph for a (B, H, Lq, Lk, D) shape on one device."""

    def __init__(self, cudnn, handle, shape_q, shape_k, scale: float, device,
                 out_dtype: torch.dtype, stats: bool = False) -> None:  # fmt: skip
        b, lq, h, d = shape_q
        lk = shape_k[1]
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32,
                              compute_data_type=fp32, handle=handle)  # fmt: skip

        def bshd(name, seq):  # logical (B, H, S, D) over (B, S, H, D) memory
            return graph.tensor(name=name, dim=[b, h, seq, d],
                                stride=[seq * h * d, d, h * d, 1], data_type=e4m3)  # fmt: skip

        self.q, self.k, self.v = bshd("q", lq), bshd("k", lk), bshd("v", lk)
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.dq, self.dk, self.dv, self.ds, self.ss, self.so = (
            graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")
        )
        o, lse, amax_s, amax_o = graph.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.dq, descale_k=self.dk,
            descale_v=self.dv, descale_s=self.ds, scale_s=self.ss, scale_o=self.so,
            attn_scale=scale, use_causal_mask=False, generate_stats=stats, name="sdpa_fp8",
        )  # fmt: skip
        if stats:  # per-row log-sum-exp of the scaled scores: merges key chunks
            lse.set_output(True).set_dim([b, h, lq, 1]).set_stride([h * lq, lq, 1, 1])
            lse.set_data_type(fp32)
        self.lse = lse if stats else None
        o.set_output(True).set_dim([b, h, lq, d]).set_stride([lq * h * d, d, h * d, 1])
        self.out_dtype = out_dtype  # e4m3 (dequantized by the caller) or the compute dtype
        o.set_data_type(e4m3 if out_dtype == FP8 else _CUDNN_DTYPES[out_dtype](cudnn))
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        self.o, self.amax_s, self.amax_o = o, amax_s, amax_o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.handle, self.cudnn = graph, handle, cudnn
        self.workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        self.amax_buf = torch.empty(2, 1, 1, 1, 1, device=device, dtype=torch.float32)
        self.s_scale = torch.full((1, 1, 1, 1), FP8_MAX, device=device)
        self.s_descale = torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, device=device)
        self.s_one = torch.ones((1, 1, 1, 1), device=device)
        self.out_shape = (b, lq, h, d)

    def run(self, q8, dq, k8, dk, v8, dv) -> torch.Tensor:
        """O (B, Lq, H, D): e4m3 scaled by ``dv`` (V's descale), or already in ``out_dtype``;
        a plan built with ``stats`` returns (O, log-sum-exp (B, H, Lq, 1) fp32)."""
        o8 = torch.empty(self.out_shape, device=q8.device, dtype=self.out_dtype)
        scale_o = 1.0 / dv if self.out_dtype == FP8 else self.s_one  # e4m3 O takes V's scale
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {
            self.q: q8, self.k: k8, self.v: v8, self.dq: dq, self.dk: dk, self.dv: dv,
            self.ds: self.s_descale, self.ss: self.s_scale, self.so: scale_o, self.o: o8,
            self.amax_s: self.amax_buf[0], self.amax_o: self.amax_buf[1],
        }  # fmt: skip
        lse = None
        if self.lse is not None:
            b, lq, h, _ = self.out_shape
            lse = torch.empty((b, h, lq, 1), device=q8.device, dtype=torch.float32)
            pack[self.lse] = lse
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return o8 if lse is None else (o8, lse)


class CudnnFp8Attention(AttentionBackend):
    """e4m3 attention through cuDNN's FP8 SDPA, with pinned SDPA as the clean fallback.

    Args:
        fallback: SDPA kernel of the calls FP8 does not take (auto | cudnn | flash | ...).
        min_kv_tokens: calls with fewer keys use the fallback (text cross-attention: 512 keys).
        exact_commit: the commit forward (clean K/V written to the cache for every later block)
            attends with the fallback kernel, so FP8 error does not accumulate through the
            cache; the denoising forwards, the step latency, stay FP8.
        emulate: without the cuDNN path, run the e4m3 scheme as fp32 torch ops instead of SDPA.
        max_keys: the most keys one kernel call attends to; more run as near-equal key chunks
            whose outputs are merged by their log-sum-exp (cuDNN's softmax stats). 0: never.
        max_scores: the most attention scores (B * H * Lq * Lk) one kernel call computes; a
            longer query range is split into row chunks of one plan each (exact: queries are
            independent). 0: never. Neither limit is needed on the H200 (random data keeps the
            scheme's error up to 84480 x 84480 tokens unsplit); both were the first guesses at
            the Cosmos error that ``smooth`` fixes.
        smooth: K and V minus their means over the keys before quantizing, V's mean added back
            to O (exact identities, ``kv_means``): the kernel's P.V accumulation otherwise
            loses precision as the keys grow on real activations.
    """

    wants_kv_amax = True  # a KV cache with track_amax saves the amax pass over K/V
    #: ``routes()``: "fp8" (the cuDNN kernel); calls FP8 does not take by design (``exact``,
    #: ``masked``, ``short_keys``: under ``min_kv_tokens``) and those the kernel cannot run
    #: (``no_frontend``, ``not_cuda``, ``no_triton``: the quantize kernels, ``arch``: below
    #: sm90, ``head_dim``: not a multiple of 16, ``no_plan``: cuDNN built no plan for the shape)
    #: as ``fallback:<reason>`` (SDPA), or ``emulated:<reason>`` with ``emulate``
    kernel_routes = ("fp8",)
    _POLICY = ("exact", "masked", "short_keys")
    _UNREADY = ("no_frontend", "not_cuda", "no_triton", "arch", "head_dim")
    known_routes = ("fp8", *(f"fallback:{r}" for r in (*_POLICY, *_UNREADY, "no_plan")))

    def __init__(self, fallback: str = "cudnn", min_kv_tokens: int = 2048,
                 exact_commit: bool = True, emulate: bool = False,
                 max_scores: int = 0, max_keys: int = 0, smooth: bool = True) -> None:  # fmt: skip
        if int(min_kv_tokens) < 0:
            raise ConfigError(f"attention.min_kv_tokens={min_kv_tokens} must be >= 0")
        if int(max_scores) < 0:
            raise ConfigError(f"attention.max_scores={max_scores} must be >= 0 (0: never split)")
        self.max_scores = int(max_scores)
        if int(max_keys) < 0:
            raise ConfigError(f"attention.max_keys={max_keys} must be >= 0 (0: never split)")
        self.max_keys = int(max_keys)
        self.smooth = bool(smooth)
        self.sdpa = SdpaAttention(fallback)
        self.min_kv_tokens = int(min_kv_tokens)
        self.has_exact_mode = bool(exact_commit)
        self._exact = False
        self.emulate = bool(emulate)
        self._cudnn = find_cudnn_frontend()
        self._handles: dict[int, object] = {}
        self._plans: dict[tuple, _Fp8Plan | None] = {}
        self._logged: set[str] = set()
        self.name = "cudnn_fp8"
        if self.emulate:
            self.known_routes = (*self.known_routes, *(f"emulated:{r}" for r in self._UNREADY))
        if self._cudnn is None:
            self.kernel_unavailable = "nvidia-cudnn-frontend is not installed"
            self._once("missing", "attention=cudnn_fp8: nvidia-cudnn-frontend is not installed "
                       "(pip install nvidia-cudnn-frontend); %s", self._fallback_words())  # fmt: skip

    @contextlib.contextmanager
    def exact(self):
        before = self._exact
        self._exact = before or self.has_exact_mode  # without the mode, calls stay FP8
        try:
            yield
        finally:
            self._exact = before

    def _fallback_words(self) -> str:
        return "emulating e4m3 in fp32" if self.emulate else f"using SDPA ({self.sdpa.backend})"

    def _once(self, kind: str, msg: str, *args) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.info(msg, *args)

    def _declines(self, q: torch.Tensor) -> str | None:
        """Why the cuDNN kernel cannot take ``q``'s call (a ``routes()`` reason), or None."""
        if self._cudnn is None:
            return "no_frontend"
        if q.device.type != "cuda":
            return "not_cuda"
        if kernels() is None:
            return "no_triton"
        if torch.cuda.get_device_capability(q.device) < (9, 0):
            self._once("arch", "attention=cudnn_fp8: cuDNN FP8 attention needs sm90+ (%s); %s",
                       torch.cuda.get_device_name(q.device), self._fallback_words())  # fmt: skip
            return "arch"
        return None if q.shape[-1] % 16 == 0 else "head_dim"

    def _plan(self, q: torch.Tensor, k: torch.Tensor, stats: bool = False) -> _Fp8Plan | None:
        key = (q.device.index, tuple(q.shape), k.shape[1], stats)
        if key not in self._plans:
            dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
            if dev not in self._handles:
                with torch.cuda.device(dev):
                    self._handles[dev] = self._cudnn.create_handle()
            self._plans[key], errors = None, []
            # O in the compute dtype where the kernel writes it (Blackwell), else e4m3 (Hopper)
            blackwell = torch.cuda.get_device_capability(q.device) >= (10, 0)
            outs = [q.dtype, FP8] if blackwell and q.dtype in _CUDNN_DTYPES else [FP8]
            for out_dtype in outs:
                try:
                    with torch.cuda.device(dev):
                        self._plans[key] = _Fp8Plan(
                            self._cudnn, self._handles[dev], q.shape, k.shape,
                            1.0 / math.sqrt(q.shape[-1]), q.device, out_dtype, stats,
                        )  # fmt: skip
                    break
                except Exception as err:  # cuDNN raises its own types for unsupported graphs
                    errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            if self._plans[key] is None:
                self._once(f"build{key}", "attention=cudnn_fp8: cuDNN cannot run shape q=%s "
                           "k=%s (%s); such calls use SDPA", tuple(q.shape), tuple(k.shape),
                           "; ".join(errors))  # fmt: skip
            else:
                self._once("out", "attention=cudnn_fp8: O written in %s",
                           str(self._plans[key].out_dtype).removeprefix("torch."))  # fmt: skip
        return self._plans[key]

    def __call__(self, q, k, v, mask=None, kv_amax=None):
        if self._exact or mask is not None or k.shape[1] < self.min_kv_tokens:
            why = "exact" if self._exact else "masked" if mask is not None else "short_keys"
            self._route(f"fallback:{why}")
            return self.sdpa(q, k, v, mask)
        why = self._declines(q)
        if why is not None:
            if self.emulate:
                self._route(f"emulated:{why}")
                return reference_fp8_attention(q, k, v, smooth=self.smooth)
            self._route(f"fallback:{why}")
            return self.sdpa(q, k, v, mask)
        lk = k.shape[1]
        keys = math.ceil(lk / math.ceil(lk / self.max_keys)) if self.max_keys else lk
        spans = [(j, min(j + keys, lk)) for j in range(0, lk, keys)]  # near-equal key chunks
        rows = query_rows(q.shape, keys, self.max_scores)
        split = len(spans) > 1
        plans = {(i, j): self._plan(q[:, i : i + rows], k[:, j:stop], split)
                 for i in range(0, q.shape[1], rows) for j, stop in spans}  # fmt: skip
        if any(plan is None for plan in plans.values()):
            self._route("fallback:no_plan")
            return self.sdpa(q, k, v, mask)
        self._route("fp8")
        # a KV cache with track_amax hands over a bound on |K|, |V|: one pass over them, not two
        bounds = (None, None, None) if kv_amax is None else (None, *kv_amax)
        means = (None, None, None)
        if self.smooth:  # |x - m| <= bound + max |m|: the cache's bound still holds
            means = (None, *kv_means(k, v))
            if kv_amax is not None:
                bounds = (None, *(b + m.abs().amax() for b, m in zip(bounds[1:], means[1:],
                                                                      strict=True)))  # fmt: skip
        (q8, dq), (k8, dk), (v8, dv) = (quantize_tensor_device(x, bound, offset)
                                        for x, bound, offset in zip((q, k, v), bounds, means,
                                                                    strict=True))  # fmt: skip
        v_mean = means[2]
        # one Q, K, V scale for every chunk: the chunks are one call's rows and keys
        starts = range(0, q.shape[1], rows)
        if not split:  # query-row chunks (or the whole call) over all keys
            parts = [plans[i, 0].run(q8[:, i : i + rows].contiguous() if len(starts) > 1 else q8,
                                     dq, k8, dk, v8, dv) for i in starts]  # fmt: skip
            o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            if o.dtype == FP8:  # V's mean added back in the dequantizing pass
                return dequantize_tensor(o, dv, q.dtype, v_mean)
            return o if v_mean is None else o + v_mean.to(o.dtype)
        keys8 = [(k8[:, j:stop].contiguous(), v8[:, j:stop].contiguous()) for j, stop in spans]
        outs = []
        for i in starts:
            qi, acc, acc_lse = q8[:, i : i + rows].contiguous(), None, None
            for (j, _), (kj, vj) in zip(spans, keys8, strict=True):
                o, lse = plans[i, j].run(qi, dq, kj, dk, vj, dv)  # (B, rows, H, D), (B, H, rows, 1)
                o = dequantize_tensor(o, dv, torch.float32) if o.dtype == FP8 else o.float()
                acc, acc_lse = merge_lse(acc, acc_lse, o, lse[..., 0].transpose(1, 2))
            outs.append(acc)
        o = torch.cat(outs, dim=1)
        return (o if v_mean is None else o + v_mean).to(q.dtype)


def query_rows(shape_q, keys: int, max_scores: int, multiple: int = 128) -> int:
    """Query rows per kernel call so that B * H * rows * keys <= ``max_scores`` (0: all rows),
    a multiple of ``multiple`` (the kernel's query tile) and at least one tile."""
    b, lq, h = shape_q[0], shape_q[1], shape_q[2]
    if max_scores <= 0 or b * h * lq * keys <= max_scores:
        return lq
    rows = max_scores // (b * h * keys) // multiple * multiple
    return min(lq, max(rows, multiple))
