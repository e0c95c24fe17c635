"""A Wan block's norms, modulation and gated residuals as one pass each.

Between its GEMMs a Wan block reads and writes its (L, C) tokens about a dozen times: LayerNorm
of the fp32 residual stream, the per-frame adaLN shift/scale, the gated residual add (and the
q/k RMS norm + RoPE: ``flashdreams.model.fused_rope``). Inductor fuses these into regions, but a
LayerNorm whose output feeds a per-frame broadcast comes out as a reduction kernel plus a second
pass. The ops here do each stage in one read and one write of the rows:

    add_norm(x, y, ...)        x + y [* gate] (fp32), then LayerNorm [+ affine] [+ modulation]
                               (between blocks: the FFN residual and the next block's norm1)
    norm_modulate(x, ...)      LayerNorm [+ affine] [+ modulation]
    gated_add(x, y, gate)      x + y * gate (fp32)

Rows up to a few thousand columns are held whole in registers; wider rows with a residual add
(the 14B blocks' 5120) stream through in 1024-column chunks, two passes per row (the second
reads the just-written residual back from L2), which keeps the registers few and every lane live.

Rounding follows the unfused modules step by step (the residual and the LayerNorm in fp32, the
modulated result rounded once to the model dtype). Without CUDA or Triton each op runs that
unfused math, which is also the reference the GPU tests compare the kernels with.

The adaLN shift / scale / gate are chunks of the block's modulation, ``table + e0`` with the
block's (1, 6, C) parameter and the (B, F, 6, C) per-frame time embedding: the kernels add the
two themselves (no separate kernels for the small modulation tensors), once per program, whose
rows all lie in one frame; token ``l`` of batch ``b`` uses frame ``l // (L // F)``. The ops are
custom ops, so ``torch.compile`` keeps each kernel whole inside the compiled regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams.kernels import as_rows, cuda_kernels, next_pow2, triton_kernels
from flashdreams.model.layers import gated_residual, modulate

# (rows per tile, warps, tiles per program); None: chosen from the row width
# (scripts/bench_fusions.py sweeps these)
TUNE: dict[str, tuple[int, int, int] | None] = {"norm": None}
# row width -> columns per chunk of the chunked two-pass kernel, 0 for whole rows (absent: the
# built-in choice, ``_chunk``)
CHUNK: dict[int, int] = {}


def _chunk(cols: int, residual: bool) -> int:
    """Columns per chunk for a row of ``cols`` (0: whole rows in registers). Wide rows with a
    residual add (``add_norm``, ``gated_add``) go in 1024-column chunks, one row per program:
    at width 5120 on an H200, ``add_norm`` 81-96 us against 100-105 for whole rows and
    ``gated_add`` 59 against 69 (the norm-only pass stays whole: 55.5 against 57.0); at width
    1536 whole rows win."""
    if cols in CHUNK:
        return CHUNK[cols]
    return 1024 if residual and cols >= 4096 and cols % 1024 == 0 else 0


def _config(kind: str, block_c: int, rows_budget: int, per_warp: int) -> tuple[int, int, int]:
    """Rows per tile, warps and tiles per program: ``rows_budget`` values per tile,
    ``per_warp`` per warp, at most 8 warps, and max(4, block_c / 1024) rows per program (the
    per-program loads of modulation chunks, weight and bias grow with the width; the best of
    scripts/bench_fusions.py's sweeps on an H200 at widths 1536 and 5120)."""
    if TUNE.get(kind) is not None:
        return TUNE[kind]
    block_r = max(1, min(4, rows_budget // block_c))
    warps = min(8, max(4, block_c * block_r // per_warp))
    return block_r, warps, max(1, max(4, block_c // 1024) // block_r)


@triton_kernels
def _kernels(triton, tl):
    @triton.jit
    def mod_chunk(e_ptr, t_ptr, frame, e_c, cols, c, K: tl.constexpr,
                  HAS_TABLE: tl.constexpr):  # fmt: skip
        """Chunk K of the block's modulation (table + e0) at one frame, in fp32, as a
        (1, BLOCK_C) row shared by the program's rows."""
        v = tl.load(e_ptr + frame + K * e_c + c, mask=c < cols, other=0.0).to(tl.float32)
        if HAS_TABLE:
            t = tl.load(t_ptr + K * cols + c, mask=c < cols, other=0.0).to(tl.float32)
            v = t + v
        return v[None, :]

    @triton.jit
    def residual(x_ptr, y_ptr, xo_ptr, r, c, m, cols, x_row, y_row, g,
                 HAS_Y: tl.constexpr, GATED: tl.constexpr):  # fmt: skip
        """Rows ``r``, columns ``c`` of x in fp32; with HAS_Y, x + y [* g], stored to xo too."""
        x = tl.load(x_ptr + r[:, None] * x_row + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + r[:, None] * y_row + c[None, :], mask=m, other=0.0)
            y = y.to(tl.float32)
            if GATED:
                y = y * g
            x = x + y
            tl.store(xo_ptr + r[:, None] * cols + c[None, :], x, mask=m)
        return x

    @triton.jit
    def norm_rows(x_ptr, y_ptr, e_ptr, t_ptr, n_ptr, w_ptr, b_ptr, xo_ptr, h_ptr,
                  rows, cols, seq, per_frame, e_b, e_f, e_c, x_row, y_row, eps,
                  HAS_Y: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
                  HAS_TABLE: tl.constexpr, HAS_NTABLE: tl.constexpr,
                  GATE: tl.constexpr, SHIFT: tl.constexpr,
                  SCALE: tl.constexpr, BLOCK_R: tl.constexpr, LOOP: tl.constexpr,
                  BLOCK_C: tl.constexpr):  # fmt: skip
        # LOOP tiles of BLOCK_R rows per program, all in one frame (BLOCK_R * LOOP divides
        # the tokens per frame): the modulation chunks, weight and bias are loaded once
        # per program (from L2: at width 5120 they outweigh a row's own bytes)
        first = tl.program_id(0).to(tl.int64) * (BLOCK_R * LOOP)
        c = tl.arange(0, BLOCK_C)
        live_c = c < cols
        frame = (first // seq) * e_b + ((first % seq) // per_frame) * e_f
        g = 0.0
        if HAS_Y:
            if GATE >= 0:
                g = mod_chunk(e_ptr, t_ptr, frame, e_c, cols, c, GATE, HAS_TABLE)
        if NORM:
            if AFFINE:
                w = tl.load(w_ptr + c, mask=live_c, other=0.0).to(tl.float32)[None, :]
                bias = tl.load(b_ptr + c, mask=live_c, other=0.0).to(tl.float32)[None, :]
            if SCALE >= 0:
                # shift / scale from n_ptr: this block's table, or the next block's when
                # the FFN residual and the next norm1 run as one pass
                sc = 1 + mod_chunk(e_ptr, n_ptr, frame, e_c, cols, c, SCALE, HAS_NTABLE)
                sh = mod_chunk(e_ptr, n_ptr, frame, e_c, cols, c, SHIFT, HAS_NTABLE)
        for i in range(LOOP):
            r = first + i * BLOCK_R + tl.arange(0, BLOCK_R)
            m = (r < rows)[:, None] & live_c[None, :]
            x = residual(x_ptr, y_ptr, xo_ptr, r, c, m, cols, x_row, y_row, g, HAS_Y, GATE >= 0)
            if NORM:
                mean = tl.sum(x, 1) / cols
                d = tl.where(m, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(d * d, 1) / cols + eps)
                h = d * rstd[:, None]
                if AFFINE:
                    h = h * w + bias
                if SCALE >= 0:
                    h = h * sc + sh
                dst = h_ptr + r[:, None] * cols + c[None, :]
                tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def norm_rows_chunked(x_ptr, y_ptr, e_ptr, t_ptr, n_ptr, w_ptr, b_ptr, xo_ptr, h_ptr,
                          rows, cols, seq, per_frame, e_b, e_f, e_c, x_row, y_row, eps,
                          HAS_Y: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
                          HAS_TABLE: tl.constexpr, HAS_NTABLE: tl.constexpr,
                          GATE: tl.constexpr, SHIFT: tl.constexpr, SCALE: tl.constexpr,
                          BLOCK_R: tl.constexpr, LOOP: tl.constexpr,
                          CHUNK: tl.constexpr):  # fmt: skip
        # norm_rows for wide rows, CHUNK columns at a time (few registers, no masked lanes
        # where CHUNK divides the width): pass 1 adds the residual, stores it and merges each
        # chunk's mean and squared deviations (Chan et al.); pass 2 reads the stored rows back
        # (from L2) and normalizes them
        first = tl.program_id(0).to(tl.int64) * (BLOCK_R * LOOP)
        frame = (first // seq) * e_b + ((first % seq) // per_frame) * e_f
        src = xo_ptr if HAS_Y else x_ptr
        src_row = cols if HAS_Y else x_row
        for i in range(LOOP):
            r = first + i * BLOCK_R + tl.arange(0, BLOCK_R)
            live_r = (r < rows)[:, None]
            mean = tl.zeros([BLOCK_R], tl.float32)
            m2 = tl.zeros([BLOCK_R], tl.float32)
            for c0 in range(0, cols, CHUNK):
                c = c0 + tl.arange(0, CHUNK)
                m = live_r & (c < cols)[None, :]
                g = 0.0
                if HAS_Y:
                    if GATE >= 0:
                        g = mod_chunk(e_ptr, t_ptr, frame, e_c, cols, c, GATE, HAS_TABLE)
                x = residual(x_ptr, y_ptr, xo_ptr, r, c, m, cols, x_row, y_row, g, HAS_Y,
                             GATE >= 0)  # fmt: skip
                if NORM:
                    n = tl.minimum(cols - c0, CHUNK).to(tl.float32)
                    cm = tl.sum(x, 1) / n
                    d = tl.where(m, x - cm[:, None], 0.0)
                    done = c0 * 1.0  # columns merged so far, as fp32
                    delta = cm - mean
                    mean = mean + delta * (n / (done + n))
                    m2 = m2 + tl.sum(d * d, 1) + delta * delta * (done * n / (done + n))
            if NORM:
                rstd = tl.rsqrt(m2 / cols + eps)[:, None]
                for c0 in range(0, cols, CHUNK):
                    c = c0 + tl.arange(0, CHUNK)
                    m = live_r & (c < cols)[None, :]
                    x = tl.load(src + r[:, None] * src_row + c[None, :], mask=m, other=0.0)
                    h = (x.to(tl.float32) - mean[:, None]) * rstd
                    if AFFINE:
                        w = tl.load(w_ptr + c, mask=c < cols, other=0.0).to(tl.float32)
                        bias = tl.load(b_ptr + c, mask=c < cols, other=0.0).to(tl.float32)
                        h = h * w[None, :] + bias[None, :]
                    if SCALE >= 0:
                        sc = mod_chunk(e_ptr, n_ptr, frame, e_c, cols, c, SCALE, HAS_NTABLE)
                        sh = mod_chunk(e_ptr, n_ptr, frame, e_c, cols, c, SHIFT, HAS_NTABLE)
                        h = h * (1 + sc) + sh
                    dst = h_ptr + r[:, None] * cols + c[None, :]
                    tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=m)

    return norm_rows, norm_rows_chunked


def _check_mod(
    x: torch.Tensor,
    e0: torch.Tensor | None,
    table: torch.Tensor | None,
    *chunks: int,
    norm_table: torch.Tensor | None = None,
) -> None:
    used = [k for k in chunks if k >= 0]
    if not used:
        return
    if e0 is None:
        raise ValueError("modulation chunks given without e0")
    if e0.dim() != 4 or e0.shape[-1] != x.shape[-1] or max(used) >= e0.shape[2]:
        raise ValueError(f"e0 of shape {list(e0.shape)} is not (B, F, chunks, {x.shape[-1]}) "
                         f"with chunks {used}")  # fmt: skip
    if x.shape[1] % e0.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens do not split into {e0.shape[1]} frames")
    for t in (table, norm_table):
        if t is not None and t.numel() != e0.shape[2] * e0.shape[3]:
            raise ValueError(f"modulation table of shape {list(t.shape)} does not match e0's "
                             f"{list(e0.shape[2:])}")  # fmt: skip


def _check_shift_scale(shift: int, scale: int) -> None:
    if (shift < 0) != (scale < 0):
        raise ValueError(f"shift chunk {shift} and scale chunk {scale}: give both or neither")


def _mod_reference(e0, table, k):
    """Chunk k of ``table + e0`` as (B, F, C) fp32 (None for k < 0)."""
    if k < 0:
        return None
    mod = e0.float() if table is None else table.float().reshape(e0.shape[2:]) + e0.float()
    return mod[:, :, k]


def _launch_norm(kernels, x, y, e0, table, gate, weight, bias, shift, scale, eps, out_dtype, norm,
                 norm_table=None):  # fmt: skip
    b, seq, cols = x.shape
    x2 = as_rows(x)
    y2 = None if y is None else as_rows(y)
    used = max(gate, shift, scale) >= 0
    if used:
        e0 = e0 if e0.stride(-1) == 1 else e0.contiguous()
        e0 = e0.expand(b, -1, -1, -1)
        table = None if table is None else table.reshape(-1, cols).contiguous()
        norm_table = table if norm_table is None else norm_table.reshape(-1, cols).contiguous()
    rows = b * seq
    xo = torch.empty(b, seq, cols, device=x.device, dtype=torch.float32) if y is not None else x
    h = torch.empty(b, seq, cols, device=x.device, dtype=out_dtype) if norm else xo
    block_c = next_pow2(cols)
    chunk = _chunk(cols, y is not None)
    if chunk:  # one row per program, nothing to share between rows (chunks load their own)
        block_r, warps, loop = TUNE["norm"] or (1, 8, 1)
    elif not norm:  # gated_add
        block_r, warps, loop = _config("norm", block_c, 2048, 256)
    else:  # norm_modulate (y None) / add_norm
        budget = 4096 if y is None else max(4096, 2 * block_c)  # add_norm: 2 rows per tile
        block_r, warps, loop = _config("norm", block_c, budget, 1024 if y is None else 512)
    per_frame = seq // e0.shape[1] if used else seq
    while per_frame % block_r:  # a program's rows must share one frame
        block_r //= 2
    while per_frame % (block_r * loop):
        loop //= 2
    dummy = x2
    e_b, e_f, e_c = (e0.stride(0), e0.stride(1), e0.stride(2)) if used else (0, 0, 0)
    kernel, last = (kernels[1], {"CHUNK": chunk}) if chunk else (kernels[0], {"BLOCK_C": block_c})
    kernel[(-(-rows // (block_r * loop)),)](
        x2, dummy if y2 is None else y2, e0 if used else dummy,
        table if used and table is not None else dummy,
        norm_table if used and norm_table is not None else dummy,
        dummy if weight is None else weight, dummy if bias is None else bias, xo, h,
        rows, cols, seq, per_frame, e_b, e_f, e_c, x2.stride(0),
        0 if y2 is None else y2.stride(0), eps,
        HAS_Y=y is not None, NORM=norm, AFFINE=weight is not None,
        HAS_TABLE=used and table is not None, HAS_NTABLE=used and norm_table is not None,
        GATE=gate if y is not None else -1, SHIFT=shift, SCALE=scale, BLOCK_R=block_r, LOOP=loop,
        num_warps=warps, **last,
    )  # fmt: skip
    return xo, h


def _norm_reference(x, weight, bias, shift, scale, eps, out_dtype):
    cols = x.shape[-1]
    w = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    h = F.layer_norm(x.float(), (cols,), w, bias, eps)
    if shift is not None:
        h = modulate(h.unflatten(1, (shift.shape[1], -1)), shift, scale).flatten(1, 2)
    return h.to(out_dtype)


@torch.library.custom_op("flashdreams::norm_modulate", mutates_args=())
def norm_modulate(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  e0: torch.Tensor | None, table: torch.Tensor | None, shift: int, scale: int,
                  eps: float, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``LayerNorm(x)[* weight + bias][* (1 + scale) + shift]`` of (B, L, C) tokens in fp32,
    rounded to ``out_dtype``. shift / scale are chunks of the block's modulation
    ``table + e0`` ((6, C) + (B, F, 6, C)), per frame; -1 for both: no modulation."""
    _check_mod(x, e0, table, shift, scale)
    _check_shift_scale(shift, scale)
    kernels = cuda_kernels(_kernels, x, e0, table)
    if kernels is not None:
        return _launch_norm(kernels, x, None, e0, table, -1, weight, bias, shift, scale, eps, out_dtype,
                            True)[1]  # fmt: skip
    sh, sc = (_mod_reference(e0, table, k) for k in (shift, scale))
    return _norm_reference(x, weight, bias, sh, sc, eps, out_dtype).contiguous()


@norm_modulate.register_fake
def _(x, weight, bias, e0, table, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("flashdreams::add_norm", mutates_args=())
def add_norm(x: torch.Tensor, y: torch.Tensor, e0: torch.Tensor | None,
             table: torch.Tensor | None, gate: int, weight: torch.Tensor | None,
             bias: torch.Tensor | None, shift: int, scale: int, eps: float,
             out_dtype: torch.dtype, norm_table: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The residual ``x + y [* gate]`` (fp32) and its ``norm_modulate`` in one pass (chunk
    indices as there; gate -1: a plain add). ``norm_table``: shift / scale are chunks of
    ``norm_table + e0`` instead (the next block's norm1 after this block's FFN residual)."""
    _check_mod(x, e0, table, gate, shift, scale, norm_table=norm_table)
    _check_shift_scale(shift, scale)
    kernels = cuda_kernels(_kernels, x, y, e0, table, norm_table)
    if kernels is not None:
        return _launch_norm(kernels, x, y, e0, table, gate, weight, bias, shift, scale, eps, out_dtype,
                            True, norm_table)  # fmt: skip
    xo = gated_residual(x, y, _mod_reference(e0, table, gate)).contiguous()  # the fake's layout
    ntable = table if norm_table is None else norm_table
    sh, sc = (_mod_reference(e0, ntable, k) for k in (shift, scale))
    return xo, _norm_reference(xo, weight, bias, sh, sc, eps, out_dtype).contiguous()


@add_norm.register_fake
def _(x, y, e0, table, gate, weight, bias, shift, scale, eps, out_dtype, norm_table=None):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("flashdreams::gated_add", mutates_args=())
def gated_add(x: torch.Tensor, y: torch.Tensor, e0: torch.Tensor | None,
              table: torch.Tensor | None, gate: int) -> torch.Tensor:  # fmt: skip
    """``x + y [* gate]`` in fp32, gate the chunk of ``table + e0`` per frame (-1: none)."""
    _check_mod(x, e0, table, gate)
    kernels = cuda_kernels(_kernels, x, y, e0, table)
    if kernels is not None:
        return _launch_norm(kernels, x, y, e0, table, gate, None, None, -1, -1, 0.0, torch.float32,
                            False)[0]  # fmt: skip
    return gated_residual(x, y, _mod_reference(e0, table, gate)).contiguous()


@gated_add.register_fake
def _(x, y, e0, table, gate):
    return x.new_empty(x.shape, dtype=torch.float32)
