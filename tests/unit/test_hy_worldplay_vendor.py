"""The bench's HY-WorldPlay peer (scripts/hy_worldplay_vendor.py): the release's own classes.

The release's files are not in the repository (a git-excluded copy, ``.vendor/hyworld``, or
``HYWORLD_VENDOR``); the tests that need them skip without it. The full side-by-side check is
the bench's CPU smoke run: ``scripts/bench_hy_worldplay.py --tiny --blocks 3 --vendor PATH``
(the release's pipeline and ours on the same weights and noise agree to ~2e-6 in fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENDOR = Path(os.environ.get("HYWORLD_VENDOR", ROOT / ".vendor" / "hyworld"))
needs_vendor = pytest.mark.skipif(
    not (VENDOR / "wan" / "inference" / "pipeline_wan_w_mem_relative_rope.py").is_file(),
    reason=f"no HY-WorldPlay copy at {VENDOR} (set HYWORLD_VENDOR)",
)

# run in a child: the release's imports (its stand-ins, top-level `models` / `inference`
# packages) must not leak into this test process
CHECK = """
import sys, tempfile, torch, torch.nn.functional as F
from types import SimpleNamespace
sys.path.insert(0, "scripts")
import hy_worldplay_vendor as V
from flashdreams.io.checkpoint import check_state_dict, read_state_dict
from flashdreams.model.hy_worldplay.model import HYWorldPlayDiT, convert_hy_worldplay

ns = V.import_vendor(sys.argv[1], None, compile_dit=False)
m = SimpleNamespace(dim=64, num_heads=2, num_layers=2, ffn_dim=128, in_dim=48, out_dim=48,
                    text_dim=32, freq_dim=256, patch_size=[1, 2, 2], cross_attn_norm=True,
                    eps=1e-6, rope_max_pos=1024)
dit = V.build_transformer(ns, m, "cpu", torch.float32)
zero = [n for n, p in dit.named_parameters() if not p.any()]
assert not zero, f"release layers left at zero: {zero[:3]}"
with tempfile.TemporaryDirectory() as tmp:
    state = read_state_dict(V.release_checkpoint(dit, tmp), convert_hy_worldplay, "generator")
with torch.device("meta"):
    ours = HYWorldPlayDiT(dim=64, num_heads=2, num_layers=2, ffn_dim=128, text_dim=32,
                          text_len=8)
check_state_dict(ours, state, source="release")
q, k, v = torch.randn(3, 2, 2, 16, 32).unbind(0)
out = sys.modules["sageattention"].sageattn(q, k, v, tensor_layout="HND", is_causal=False)
torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
print("ok")
"""


@needs_vendor
def test_release_transformer_converts_into_ours_and_attention_stand_in_is_sdpa():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK, str(VENDOR)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_a_path_that_is_not_the_release_fails_in_one_line_naming_vendor(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import hy_worldplay_vendor
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "wan").mkdir()
    with pytest.raises(SystemExit) as err:
        hy_worldplay_vendor.import_vendor(tmp_path, None, compile_dit=False)
    message = str(err.value)
    assert message.startswith(f"--vendor {tmp_path}:") and "\n" not in message
    assert "pipeline_wan_w_mem_relative_rope.py" in message
    assert "sageattention" not in sys.modules  # nothing substituted before the check
