"""scripts/bench_flashvsr.py --official: the official runner's stand-in and its bad input."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_flashvsr.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_flashvsr_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_official_path_without_pipeline_is_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--official", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "--official=" in last and "flashvsr_tiny.py" in last


def test_bsa_standin_matches_block_masked_attention():
    """The --tiny stand-in keeps block_sparse_attn_func's contract: 128-token blocks, (L, H, D)."""
    func = _bench()._bsa_standin().block_sparse_attn_func
    g = torch.Generator().manual_seed(0)
    heads, lq, lk = 2, 256, 384
    q, k, v = (torch.randn(n, heads, 16, generator=g) for n in (lq, lk, lk))
    mask = torch.tensor([[[True, False, True], [False, True, False]]] * heads).unsqueeze(0)
    out = func(q, k, v, None, None, torch.ones(heads), None, mask, lq, lk, 0.0)
    assert out.shape == (lq, heads, 16)
    # query block 1 sees only key block 1: plain attention over those 128 keys
    ref = F.scaled_dot_product_attention(q[128:].transpose(0, 1), k[128:256].transpose(0, 1),
                                         v[128:256].transpose(0, 1))  # fmt: skip
    torch.testing.assert_close(out[128:], ref.transpose(0, 1))
    assert not torch.allclose(out[:128], func(q, k, v, None, None, None, None,
                                              torch.ones_like(mask), lq, lk, 0.0)[:128])  # fmt: skip


def test_unknown_scene_is_one_line_error():
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--scenes", "128x128,999x1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "--scenes: 999x1 not among 128x128, 64x96" in last


def test_bsa_build_without_sources_is_one_line_error(tmp_path):
    """The kernel build kit names what is missing before it compiles anything."""
    build = ROOT / "scripts" / "offline" / "bsa_build.py"
    run = subprocess.run([sys.executable, str(build), "--src", str(tmp_path),
                          "--build", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"bsa_build: --src={tmp_path} has no csrc/block_sparse_attn/src/flash_fwd_kernel.h"
    ]
