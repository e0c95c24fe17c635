"""Per-backend route accounting (``AttentionBackend.routes()``): how many calls ran the backend's
own kernel and how many its fallback, by reason; and the lines a benchmark prints from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdreams.attention.base import route_lines, route_report
from flashdreams.attention.cudnn_fp8 import CudnnFp8Attention
from flashdreams.attention.flash_attn import FlashAttnAttention
from flashdreams.attention.flex import FlexAttention
from flashdreams.attention.sdpa import SdpaAttention


def _qkv(lq=16, lk=64, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, heads, dim, generator=gen) for n in (lq, lk, lk))


def _taken(routes: dict) -> dict:
    return {r: n for r, n in routes.items() if n}


def test_cudnn_fp8_on_cpu_counts_every_call_as_a_fallback_with_its_reason():
    attn = CudnnFp8Attention(min_kv_tokens=32)
    routes = attn.routes()  # every known route present from the start, at 0
    assert routes["fp8"] == 0 and routes["fallback:no_frontend"] == 0
    assert routes["fallback:short_keys"] == 0 and routes["fallback:exact"] == 0
    attn._cudnn = object()  # as if nvidia-cudnn-frontend were installed: CPU is the reason
    q, k, v = _qkv()
    for _ in range(3):
        attn(q, k, v)
    attn(q, k[:, :16], v[:, :16])  # 16 keys < min_kv_tokens
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
    attn(q, k, v, mask)
    with attn.exact():
        attn(q, k, v)
        attn(q, k, v, mask)  # exact comes first: the commit's calls are counted as exact
    assert _taken(attn.routes()) == {"fallback:not_cuda": 3, "fallback:short_keys": 1,
                                     "fallback:masked": 1, "fallback:exact": 2}  # fmt: skip
    copy = attn.routes()
    copy["fp8"] = 99
    assert attn.routes()["fp8"] == 0  # a copy
    attn.reset_routes()
    assert _taken(attn.routes()) == {}


def test_cudnn_fp8_without_the_frontend_names_it():
    attn = CudnnFp8Attention(min_kv_tokens=0)
    attn._cudnn, attn.kernel_unavailable = None, "nvidia-cudnn-frontend is not installed"
    attn(*_qkv())
    assert _taken(attn.routes()) == {"fallback:no_frontend": 1}
    report = route_report(attn)
    assert report["kernel_calls"] == 0 and report["other_calls"] == 1
    line, warning = route_lines(report)
    assert line == "attention: cudnn_fp8 kernel 0 calls, fallback 1 (no_frontend 1)"
    assert warning.startswith("WARNING: attention cudnn_fp8: its kernel (fp8) ran for no call")
    assert "nvidia-cudnn-frontend is not installed" in warning
    assert "the numbers are the fallback's" in warning


def test_cudnn_fp8_emulation_is_counted_as_emulation():
    attn = CudnnFp8Attention(emulate=True, min_kv_tokens=32)
    assert attn.routes()["emulated:not_cuda"] == 0
    q, k, v = _qkv()
    attn(q, k, v)
    attn(q, k, v)
    attn(q, k[:, :8], v[:, :8])  # short keys still go to SDPA, emulate or not
    reason = "no_frontend" if attn._cudnn is None else "not_cuda"
    assert _taken(attn.routes()) == {f"emulated:{reason}": 2, "fallback:short_keys": 1}
    line = route_lines(route_report(attn))[0]
    assert line == (f"attention: cudnn_fp8 kernel 0 calls, emulated 2 ({reason} 2), "
                    "fallback 1 (short_keys 1)")  # fmt: skip


def test_cudnn_fp8_kernel_calls_and_plan_failures_are_counted(monkeypatch):
    from tests.unit.test_fp8_attention import _FakePlan

    attn = CudnnFp8Attention(min_kv_tokens=32)
    monkeypatch.setattr(attn, "_declines", lambda q: None)
    plans = {"ok": True}
    monkeypatch.setattr(attn, "_plan", lambda q, k, stats=False:
                        _FakePlan(q.shape[1]) if plans["ok"] else None)  # fmt: skip
    _FakePlan.calls = []
    q, k, v = _qkv()
    attn(q, k, v)
    attn(q, k, v)
    attn(q, k[:, :16], v[:, :16])
    plans["ok"] = False  # cuDNN built no plan for the shape
    attn(q, k, v)
    assert _taken(attn.routes()) == {"fp8": 2, "fallback:short_keys": 1, "fallback:no_plan": 1}
    lines = route_lines(route_report(attn))
    assert lines == ["attention: cudnn_fp8 kernel 2 calls, fallback 2 (short_keys 1, no_plan 1)"]


def test_flash_attn_without_the_package_counts_its_fallbacks():
    attn = FlashAttnAttention("2")
    attn.package, attn._func = None, None  # as on this CPU image
    attn.kernel_unavailable = "no flash-attn package (version 2) is installed"
    q, k, v = _qkv()
    attn(q, k, v)
    attn(q, k, v, torch.ones(q.shape[1], k.shape[1], dtype=torch.bool))
    assert _taken(attn.routes()) == {"fallback:no_package": 2}
    line, warning = route_lines(route_report(attn))
    assert line.endswith(" kernel 0 calls, fallback 2 (no_package 2)")
    assert "its kernel (flash_attn) ran for no call" in warning
    assert "no flash-attn package (version 2) is installed" in warning


def test_flash_attn_missing_is_labelled_flash_attn_not_its_fallback():
    from flashdreams.attention.flash_attn import find_flash_attn

    attn = FlashAttnAttention("2")
    if find_flash_attn("2")[1] is None:  # this CPU image: the name is the fallback's
        assert attn.name == "sdpa_cudnn" and route_report(attn)["backend"] == "flash_attn"


def test_flash_attn_counts_kernel_short_masked_and_unsupported_calls():
    attn = FlashAttnAttention("2", min_keys=32)
    seen = []

    def kernel(q, k, v, **kw):
        seen.append(k.shape[1])
        if k.shape[1] == 48:
            raise RuntimeError("not this shape")
        return SdpaAttention("math")(q, k, v)

    attn.package, attn._func = "flash-attn 2", kernel
    attn._declines = lambda q, mask: None if mask is None else "masked"  # as on a CUDA device
    q, k, v = _qkv()
    attn(q, k, v)
    attn(q, k[:, :16], v[:, :16])  # under min_keys
    attn(q, k[:, :48], v[:, :48])  # the package raises: SDPA, remembered
    attn(q, k[:, :48], v[:, :48])
    attn(q, k, v, torch.ones(q.shape[1], k.shape[1], dtype=torch.bool))
    assert seen == [64, 48]
    assert _taken(attn.routes()) == {"flash_attn": 1, "fallback:short_keys": 1,
                                     "fallback:unsupported": 2, "fallback:masked": 1}  # fmt: skip
    assert len(route_lines(route_report(attn))) == 1  # the kernel ran: no warning


def test_flash_attn_on_cpu_is_not_cuda():
    attn = FlashAttnAttention("2")
    attn.package, attn._func = "flash-attn 2", lambda q, k, v: q
    attn(*_qkv())
    assert _taken(attn.routes()) == {"fallback:not_cuda": 1}


def test_plain_backends_count_their_calls():
    sdpa = SdpaAttention()
    q, k, v = _qkv()
    sdpa(q, k, v)
    assert sdpa.routes() == {"sdpa": 1}
    assert route_lines(route_report(sdpa)) == ["attention: sdpa_auto kernel 1 calls"]
    flex = FlexAttention(compile=False)
    flex(q, k, v)
    flex(q, k, v, torch.ones(q.shape[1], k.shape[1], dtype=torch.bool))
    assert flex.routes() == {"flex": 1, "sdpa": 1}  # unmasked calls: SDPA by design
    assert route_lines(route_report(flex)) == ["attention: flex kernel 2 calls (flex 1, sdpa 1)"]


ROOT = Path(__file__).resolve().parents[2]


def _bench_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``flashdreams-bench args`` on CPU in a subprocess (offline), output under ``tmp_path``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    code = "from flashdreams.cli import bench_main; bench_main()"
    proc = subprocess.run([sys.executable, "-c", code, *args, f"paths.root={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_reports_the_routes_and_warns_when_cudnn_fp8_never_ran(tmp_path):
    """``flashdreams-bench attention=cudnn_fp8`` on CPU: the kernel cannot run, so bench.json
    records every call as a fallback and the summary says the numbers are SDPA's."""
    proc = _bench_cli(["attention=cudnn_fp8", "rollout.total_blocks=2"], tmp_path)
    (bench,) = tmp_path.glob("bench/*/*/bench.json")
    routes = json.loads(bench.read_text())["attention_routes"]
    assert routes["backend"] == "cudnn_fp8" and routes["kernel_routes"] == ["fp8"]
    assert routes["routes"]["fp8"] == 0 == routes["kernel_calls"]
    assert routes["other_calls"] > 0 and routes["routes"]["fallback:exact"] > 0  # the commits
    assert (
        sum(n for r, n in routes["routes"].items() if r.startswith("fallback:"))
        == (routes["other_calls"])
    )
    stats = json.loads((bench.parent / "stats.json").read_text())
    assert stats["attention_routes"] == routes  # flashdreams-run records them too
    lines = proc.stdout.splitlines()
    assert any(ln.strip().startswith("attention: cudnn_fp8 kernel 0 calls, fallback ")
               for ln in lines)  # fmt: skip
    (warning,) = [ln for ln in lines if "WARNING: attention cudnn_fp8" in ln]
    assert "the numbers are the fallback's, not cudnn_fp8's" in warning


def test_bench_of_plain_sdpa_prints_its_calls_without_a_warning(tmp_path):
    proc = _bench_cli(["attention=sdpa", "rollout.total_blocks=2"], tmp_path)
    (bench,) = tmp_path.glob("bench/*/*/bench.json")
    routes = json.loads(bench.read_text())["attention_routes"]
    assert routes["routes"] == {"sdpa": routes["kernel_calls"]} and routes["kernel_calls"] > 0
    assert f"attention: sdpa_auto kernel {routes['kernel_calls']} calls" in proc.stdout
    assert "WARNING: attention" not in proc.stdout


def test_bench_cosmos_reports_the_routes_of_its_timed_step(tmp_path):
    """``scripts/bench_cosmos.py --tiny --attention-config cudnn_fp8`` (CPU: the e4m3 emulation
    as the backend): bench JSON and output say the FP8 kernel ran for no call."""
    pytest.importorskip("diffusers")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cosmos.py"), "--tiny",
                           "--attention-config", "cudnn_fp8", "--repeats", "1", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    routes = json.loads(out.read_text())["attention_routes"]
    assert routes["kernel_calls"] == 0 and routes["other_calls"] > 0
    assert all(r.startswith("emulated:") for r, n in routes["routes"].items() if n)
    assert "attention: cudnn_fp8 kernel 0 calls, emulated " in proc.stdout
    assert "WARNING: attention cudnn_fp8: its kernel (fp8) ran for no call" in proc.stdout
