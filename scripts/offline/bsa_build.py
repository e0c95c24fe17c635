"""Build the one block-sparse attention kernel the official FlashVSR runner calls, on the GPU machine.

``bench_flashvsr.py --official`` runs OpenImagingLab/FlashVSR's own pipeline, whose sparse
self-attention calls mit-han-lab's ``block_sparse_attn`` (a FlashAttention-2 fork built from
source; there is no wheel). Its ``setup.py`` compiles 24 kernel files for every head size and
dtype, forward and backward: far past a device call's time box. FlashVSR's inference needs one
of them: bf16, head dim 128, not causal, no dropout, variable-length (``cu_seqlens``), one
128x128 block mask per head. This script builds exactly that kernel, with the template
arguments their dispatcher picks on sm90 for that call (``Flash_fwd_kernel_traits<128, 128, 64,
4>``, ``Is_even_MN`` false because of ``cu_seqlens``, ``Is_even_K`` true), behind a small binding
of our own that exposes ``block_sparse_attn_cuda.fwd_block`` with the signature their Python
interface calls. Any other call is refused with a one-line error naming what is not built.

Inputs (git-excluded, kept in ``.vendor/bsa``):
  SRC/csrc/block_sparse_attn/src   their kernel headers   (git archive HEAD csrc/block_sparse_attn/src)
  SRC/block_sparse_attn            their Python interface (git archive HEAD block_sparse_attn)
  SRC/cutlass_include[.tgz]        CUTLASS include/ at their submodule commit a75b4ac

  git --git-dir=<mirror of mit-han-lab/Block-Sparse-Attention> archive HEAD \
      csrc/block_sparse_attn/src block_sparse_attn | tar -x -C .vendor/bsa
  git --git-dir=<mirror of NVIDIA/cutlass> archive a75b4ac include | tar -x -C /tmp \
      && tar -czf .vendor/bsa/cutlass_include.tgz -C /tmp --transform s,^include,cutlass_include, include

On the GPU machine (nvcc and torch there; ~2 minutes):
  python3 scripts/offline/bsa_build.py --src .vendor/bsa --build /tmp/bsa
  export PYTHONPATH=/tmp/bsa:.vendor/bsa:$PYTHONPATH     # block_sparse_attn_cuda, block_sparse_attn
After the build it checks the kernel against SDPA with the same explicit mask and prints the error.
``--prebuilt DIR`` skips the compile when DIR holds a ``block_sparse_attn_cuda*.so`` built
by an earlier call on the same image (copy it back through $OUT).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cmath>
#include "namespace_config.h"
#include "flash.h"

namespace FLASH_NAMESPACE {
void fd_bsa_fwd_bf16_hd128(Flash_fwd_params &params, cudaStream_t stream);
}

// The argument list of their block_sparse_attn_cuda.fwd_block; only the FlashVSR case is built.
std::vector<at::Tensor> fwd_block(
    const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
    const at::Tensor &cu_seqlens_q, const at::Tensor &cu_seqlens_k,
    const at::Tensor &head_mask_type, std::optional<at::Tensor> streaming_info,
    std::optional<at::Tensor> row_blockmask, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double p_dropout, double softmax_scale, bool is_causal, int64_t window_left,
    int64_t window_right, int64_t m_block_dim, int64_t n_block_dim, bool exact_streaming,
    bool return_softmax, std::optional<at::Generator> gen) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "fwd_block: q, k, v must be on CUDA");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16,
              "fwd_block: this build has the bf16 kernel only");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == 128 && k.size(2) == 128 && v.size(2) == 128,
              "fwd_block: this build has head dim 128 only");
  TORCH_CHECK(!is_causal, "fwd_block: this build has the non-causal kernel only");
  TORCH_CHECK(p_dropout == 0.0 && !return_softmax, "fwd_block: this build has no dropout");
  TORCH_CHECK(!streaming_info.has_value() && !exact_streaming,
              "fwd_block: this build has no streaming heads");
  if (window_left >= max_seqlen_k) window_left = -1;
  if (window_right >= max_seqlen_k) window_right = -1;
  TORCH_CHECK(window_left < 0 && window_right < 0, "fwd_block: this build has no local window");
  TORCH_CHECK(row_blockmask.has_value(), "fwd_block: this build needs a block mask");
  TORCH_CHECK(m_block_dim == 128 && n_block_dim == 128, "fwd_block: mask blocks must be 128x128");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
              "fwd_block: last dimension must be contiguous");
  const at::Tensor mask = row_blockmask.value();
  TORCH_CHECK(mask.scalar_type() == at::kInt && mask.is_contiguous() && mask.is_cuda(),
              "fwd_block: block mask must be contiguous int32 on CUDA");
  TORCH_CHECK(head_mask_type.scalar_type() == at::kInt && head_mask_type.is_contiguous(),
              "fwd_block: head_mask_type must be contiguous int32");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_k.scalar_type() == at::kInt,
              "fwd_block: cu_seqlens must be int32");

  at::cuda::CUDAGuard guard{q.device()};
  const int batch = cu_seqlens_q.numel() - 1;
  const int heads = q.size(1), heads_k = k.size(1);
  TORCH_CHECK(heads % heads_k == 0, "fwd_block: query heads must be a multiple of key heads");
  TORCH_CHECK(head_mask_type.numel() == heads, "fwd_block: head_mask_type needs one entry per head");
  auto rounded = [](int64_t x) { return (x + 127) / 128 * 128; };
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == batch &&
              mask.size(2) == rounded(max_seqlen_q) / 128 &&
              mask.size(3) == rounded(max_seqlen_k) / 128,
              "fwd_block: block mask shape does not match the sequence lengths");

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({batch, heads, max_seqlen_q}, q.options().dtype(at::kFloat));
  at::Tensor rng = at::empty({2}, q.options().dtype(at::kLong));

  FLASH_NAMESPACE::Flash_fwd_params p = {};
  p.is_bf16 = true;
  p.q_ptr = q.data_ptr(); p.k_ptr = k.data_ptr(); p.v_ptr = v.data_ptr(); p.o_ptr = out.data_ptr();
  p.q_row_stride = q.stride(0); p.k_row_stride = k.stride(0); p.v_row_stride = v.stride(0);
  p.o_row_stride = out.stride(0);
  p.q_head_stride = q.stride(1); p.k_head_stride = k.stride(1); p.v_head_stride = v.stride(1);
  p.o_head_stride = out.stride(1);
  p.cu_seqlens_q = static_cast<int *>(cu_seqlens_q.data_ptr());
  p.cu_seqlens_k = static_cast<int *>(cu_seqlens_k.data_ptr());
  p.seqused_k = nullptr;
  p.p_ptr = nullptr;
  p.softmax_lse_ptr = lse.data_ptr();
  p.b = batch; p.h = heads; p.h_k = heads_k; p.h_h_k_ratio = heads / heads_k;
  p.seqlen_q = max_seqlen_q; p.seqlen_k = max_seqlen_k;
  p.seqlen_q_rounded = rounded(max_seqlen_q); p.seqlen_k_rounded = rounded(max_seqlen_k);
  p.d = 128; p.d_rounded = 128;
  p.total_q = q.size(0);
  p.scale_softmax = softmax_scale;
  p.scale_softmax_log2 = softmax_scale * M_LOG2E;
  p.p_dropout = 1.f;  // keep probability
  p.p_dropout_in_uint8_t = 255;
  p.rp_dropout = 1.f;
  p.scale_softmax_rp_dropout = softmax_scale;
  p.is_causal = false;
  p.window_size_left = -1; p.window_size_right = -1;
  p.is_seqlens_k_cumulative = true;
  p.head_mask_type = static_cast<int *>(head_mask_type.data_ptr());
  p.blockmask = static_cast<int *>(mask.data_ptr());
  p.m_block_dim = 128; p.n_block_dim = 128;
  p.num_blocksparse_heads = mask.size(1);
  p.streaming_info = nullptr;
  p.is_exact_streaming = false;
  p.rng_state = reinterpret_cast<uint64_t *>(rng.data_ptr());
  if (max_seqlen_k > 0) {
    FLASH_NAMESPACE::fd_bsa_fwd_bf16_hd128(p, at::cuda::getCurrentCUDAStream().stream());
  } else {
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
  }
  return {out, lse, at::empty({0}, q.options()), rng};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd_block", &fwd_block, "block-sparse forward: bf16, head dim 128, non-causal (FlashVSR)");
}
"""

KERNEL = r"""
#include "namespace_config.h"
#include <c10/cuda/CUDAException.h>
#include "flash.h"
#include "flash_fwd_kernel.h"

namespace FLASH_NAMESPACE {
// Their dispatcher's pick on sm90 for bf16 / head dim 128 / no dropout / not causal.
using FdTraits = Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>;

// <Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN (false: cu_seqlens), Is_even_K,
//  Return_softmax, Is_exact_streaming>
__global__ void fd_bsa_kernel(Flash_fwd_params params) {
  compute_block_attn<FdTraits, false, false, false, false, false, true, false, false>(params);
}

void fd_bsa_fwd_bf16_hd128(Flash_fwd_params &params, cudaStream_t stream) {
  constexpr size_t smem = FdTraits::kSmemSize;
  dim3 grid((params.seqlen_q + FdTraits::kBlockM - 1) / FdTraits::kBlockM, params.b, params.h);
  if (smem >= 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fd_bsa_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  fd_bsa_kernel<<<grid, FdTraits::kNThreads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace FLASH_NAMESPACE
"""

NVCC_FLAGS = [  # their setup.py's flags, one architecture
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-gencode",
    "arch=compute_90,code=sm_90",
]


def cutlass_include(src: Path, work: Path) -> Path:
    plain = src / "cutlass_include"
    if plain.is_dir():
        return plain
    packed = src / "cutlass_include.tgz"
    if not packed.is_file():
        sys.exit(f"bsa_build: --src={src} has neither cutlass_include/ nor cutlass_include.tgz")
    with tarfile.open(packed) as tar:
        tar.extractall(work, filter="data")
    return work / "cutlass_include"


def build(src: Path, out: Path) -> None:
    from torch.utils.cpp_extension import load

    kernels = src / "csrc" / "block_sparse_attn" / "src"
    if not (kernels / "flash_fwd_kernel.h").is_file():
        sys.exit(f"bsa_build: --src={src} has no csrc/block_sparse_attn/src/flash_fwd_kernel.h")
    out.mkdir(parents=True, exist_ok=True)
    cutlass = cutlass_include(src, out)
    (out / "fd_bsa_binding.cpp").write_text(BINDING)
    (out / "fd_bsa_kernel.cu").write_text(KERNEL)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t0 = time.perf_counter()
    load(name="block_sparse_attn_cuda", sources=[str(out / "fd_bsa_binding.cpp"),
                                                 str(out / "fd_bsa_kernel.cu")],
         extra_include_paths=[str(kernels), str(cutlass)], extra_cflags=["-O3", "-std=c++17"],
         extra_cuda_cflags=NVCC_FLAGS, build_directory=str(out), verbose=False)  # fmt: skip
    print(f"bsa_build: built in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)


def check(src: Path) -> float:
    """Their interface on our build against SDPA with the same explicit mask (bf16 vs fp32)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(src))
    from block_sparse_attn import block_sparse_attn_func

    g = torch.Generator("cuda").manual_seed(0)
    heads, lq, lk = 12, 1000, 1500  # not multiples of 128: the padded edge blocks too
    q, k, v = (torch.randn(n, heads, 128, device="cuda", generator=g, dtype=torch.bfloat16)
               for n in (lq, lk, lk))  # fmt: skip
    nb_q, nb_k = (lq + 127) // 128, (lk + 127) // 128
    mask = torch.rand(1, heads, nb_q, nb_k, device="cuda", generator=g) < 0.4
    mask[..., 0] = True  # every query row sees one block
    cu_q = torch.tensor([0, lq], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, lk], device="cuda", dtype=torch.int32)
    hmt = torch.ones(heads, device="cuda", dtype=torch.int32)
    out = block_sparse_attn_func(q, k, v, cu_q, cu_k, hmt, None, mask, lq, lk, 0.0,
                                 deterministic=False, softmax_scale=None, is_causal=False,
                                 exact_streaming=False, return_attn_probs=False)  # fmt: skip
    dense = mask.repeat_interleave(128, 2).repeat_interleave(128, 3)[0, :, :lq, :lk]
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.float().transpose(0, 1),
                                         v.float().transpose(0, 1), attn_mask=dense)  # fmt: skip
    err = ((out.float() - ref.transpose(0, 1)).norm() / ref.norm()).item()
    print(f"bsa_build: check against masked SDPA (fp32), rel L2 {err:.2e}", flush=True)
    if not err < 2e-2:
        sys.exit(f"bsa_build: the built kernel disagrees with masked SDPA (rel L2 {err:.3g})")
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="their sources (see the docstring)")
    ap.add_argument("--build", type=Path, required=True, help="build folder, then on PYTHONPATH")
    ap.add_argument("--prebuilt", type=Path, default=None,
                    help="a folder holding block_sparse_attn_cuda*.so from an earlier build")  # fmt: skip
    args = ap.parse_args()
    so = (
        sorted(glob.glob(str(args.prebuilt / "block_sparse_attn_cuda*.so")))
        if args.prebuilt
        else []
    )
    if so:
        args.build.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so[0], args.build)
        print(f"bsa_build: using {so[0]}", flush=True)
    else:
        build(args.src, args.build)
    sys.path.insert(0, str(args.build))
    check(args.src)


if __name__ == "__main__":
    main()
