"""Text encoders: random (seeded), precomputed (file round trip), UMT5 (tiny random weights).

The UMT5 test checks the Wan ``.pth`` key map two ways: against the transformers folder it
was derived from, and against an independent re-statement of Wan's T5 encoder forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from flashdreams import ConfigError
from flashdreams.io.keymap import transformers_t5_to_wan, wan_t5_to_transformers
from flashdreams.text_encoder.precomputed import PrecomputedTextEncoder, save_embeddings
from flashdreams.text_encoder.random import RandomTextEncoder
from flashdreams.text_encoder.umt5 import UMT5TextEncoder

CPU = torch.device("cpu")
WORDS = "a cat dog runs on the moon in red blue forest robot walking slowly".split()
TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
TEXT_LEN = 16


# ---------------------------------------------------------------- random
def test_random_shape_determinism_and_tail():
    enc = RandomTextEncoder(text_len=16, text_dim=8, seed=1)
    a = enc.encode(["a cat", "a dog on the moon"], CPU, torch.float32)
    assert a.shape == (2, 16, 8)
    b = RandomTextEncoder(text_len=16, text_dim=8, seed=1).encode(["a cat"], CPU, torch.float32)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0, :3], a[1, :3])
    other_seed = RandomTextEncoder(text_len=16, text_dim=8, seed=2)
    assert not torch.equal(a[0], other_seed.encode(["a cat"], CPU, torch.float32)[0])
    assert a[0, :3].abs().sum() > 0 and a[0, 3:].abs().sum() == 0  # 2 words + EOS
    assert a[1, :6].abs().sum() > 0 and a[1, 6:].abs().sum() == 0


def test_random_fixed_prompt_tokens_and_dtype():
    enc = RandomTextEncoder(text_len=8, text_dim=4, prompt_tokens=5)
    out = enc.encode(["x"], CPU, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out[0, :5].abs().sum() > 0 and out[0, 5:].abs().sum() == 0
    with pytest.raises(ValueError):
        RandomTextEncoder(text_len=8, prompt_tokens=9)


# ---------------------------------------------------------------- precomputed
def test_precomputed_roundtrip(tmp_path):
    prompts = ["a cat", "a dog"]
    emb = torch.randn(2, 16, 8).to(torch.bfloat16)
    path = tmp_path / "emb.safetensors"
    save_embeddings(path, prompts, emb)
    enc = PrecomputedTextEncoder(str(path))
    assert (enc.text_len, enc.text_dim) == (16, 8)
    out = enc.encode(["a dog", "a cat", "a dog"], CPU, torch.bfloat16)
    assert torch.equal(out, emb[[1, 0, 1]])
    with pytest.raises(ConfigError, match="a bird") as info:
        enc.encode(["a bird"], CPU, torch.float32)
    assert str(path) in str(info.value)


def test_precomputed_single_entry_serves_any_prompt(tmp_path, caplog):
    emb = torch.randn(1, 4, 2)
    save_embeddings(tmp_path / "one.safetensors", ["only"], emb)
    enc = PrecomputedTextEncoder(str(tmp_path / "one.safetensors"))
    with caplog.at_level("WARNING"):
        out = enc.encode(["something else"], CPU, torch.float32)
    assert torch.equal(out[0], emb[0])
    assert "something else" in caplog.text


# ---------------------------------------------------------------- umt5
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def t5_checkpoints(tmp_path_factory):
    """The same tiny random UMT5 encoder as a transformers folder and as a Wan ``.pth``."""
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**TINY_T5, feed_forward_proj="gated-gelu"))
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("umt5")
    model.save_pretrained(root / "hf")
    wan_state = transformers_t5_to_wan(model.state_dict())
    torch.save(wan_state, root / "models_t5_umt5-tiny-enc.pth")
    return str(root / "hf"), str(root / "models_t5_umt5-tiny-enc.pth"), wan_state


def make_encoder(checkpoint, tokenizer_dir, **kwargs):
    return UMT5TextEncoder(
        checkpoint, tokenizer_dir, text_len=TEXT_LEN, dtype="float32", config=TINY_T5, **kwargs
    )


PROMPTS = ["a cat runs on the moon", "robot walking   slowly in the red forest"]


def test_umt5_folder_and_wan_pth_agree(t5_checkpoints, tokenizer_dir):
    hf_dir, pth, _ = t5_checkpoints
    from_folder = make_encoder(hf_dir, tokenizer_dir).encode(PROMPTS, CPU, torch.float32)
    from_pth = make_encoder(pth, tokenizer_dir).encode(PROMPTS, CPU, torch.float32)
    assert from_folder.shape == (2, TEXT_LEN, 32)
    torch.testing.assert_close(from_pth, from_folder, rtol=0, atol=0)
    # lengths with EOS: 7 and 8 tokens; the tail is exactly zero
    assert from_pth[0, :7].abs().amin(-1).gt(0).all() and from_pth[0, 7:].abs().sum() == 0
    assert from_pth[1, 8:].abs().sum() == 0


def test_wan_t5_keymap_roundtrip(t5_checkpoints):
    _, _, wan_state = t5_checkpoints
    assert "blocks.1.ffn.gate.0.weight" in wan_state and "token_embedding.weight" in wan_state
    back = transformers_t5_to_wan(wan_t5_to_transformers(wan_state))
    assert back.keys() == wan_state.keys()


def _bucket(rel: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """Bidirectional T5 relative-position bucket, restated from the Wan reference."""
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = (
        exact
        + (
            torch.log(rel.float().clamp(min=1) / exact)
            / math.log(max_dist / exact)
            * (half - exact)
        ).long()
    )
    return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def _wan_t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's T5 encoder forward over Wan-named weights (x += attn(norm1 x); x += ffn(norm2 x))."""

    def norm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = sd["token_embedding.weight"][ids]  # (B, L, C)
    b, length, _ = x.shape
    pos = torch.arange(length)
    buckets = _bucket(pos[None, :] - pos[:, None])  # (L, L)
    for i in range(TINY_T5["num_layers"]):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(b, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # (H, L, L)
        scores = q @ k.transpose(-1, -2) + bias
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = scores.softmax(-1) @ v  # (B, H, L, D)
        x = x + attn.transpose(1, 2).reshape(b, length, -1) @ sd[p + "attn.o.weight"].T
        h = norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + (h @ sd[p + "ffn.fc1.weight"].T * gate) @ sd[p + "ffn.fc2.weight"].T
    return norm(x, sd["norm.weight"])


def test_umt5_matches_wan_reference_forward(t5_checkpoints, tokenizer_dir):
    _, pth, wan_state = t5_checkpoints
    enc = make_encoder(pth, tokenizer_dir)
    batch = enc.tokenizer(PROMPTS, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    ref = _wan_t5_reference(wan_state, batch.input_ids, batch.attention_mask, TINY_T5["num_heads"])
    ours = enc.encode(PROMPTS, CPU, torch.float32)
    valid = batch.attention_mask[..., None].bool()
    torch.testing.assert_close(ours, ref * valid, rtol=1e-5, atol=1e-5)


def test_umt5_cache_and_offload(t5_checkpoints, tokenizer_dir, monkeypatch):
    _, pth, _ = t5_checkpoints
    enc = make_encoder(pth, tokenizer_dir, offload=True)
    calls = []
    forward = enc.model.forward
    monkeypatch.setattr(enc.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    first = enc.encode([PROMPTS[0]], CPU, torch.float32)
    again = enc.encode([PROMPTS[0], PROMPTS[0]], CPU, torch.bfloat16)
    assert len(calls) == 1
    assert again.dtype == torch.bfloat16 and torch.equal(again[1], first[0].bfloat16())
    enc.encode(PROMPTS, CPU, torch.float32)
    assert len(calls) == 2  # only the new prompt is encoded
    assert next(enc.model.parameters()).device == CPU
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight


# ---------------------------------------------------------------- configs
def _option(name: str, model: dict, **overrides):
    from importlib.resources import files

    from omegaconf import OmegaConf

    text = (files("flashdreams") / "conf" / "text_encoder" / f"{name}.yaml").read_text()
    cfg = OmegaConf.create({"model": model, "text_encoder": OmegaConf.create(text)})
    cfg.text_encoder.merge_with(overrides)
    return cfg.text_encoder


def test_yaml_options_instantiate(tmp_path):
    from hydra.utils import get_class, instantiate

    model = {"text_len": 12, "text_dim": 6}
    enc = instantiate(_option("random", model))
    assert isinstance(enc, RandomTextEncoder) and (enc.text_len, enc.text_dim) == (12, 6)
    save_embeddings(tmp_path / "e.safetensors", ["p"], torch.zeros(1, 12, 6))
    pre = instantiate(_option("precomputed", model, path=str(tmp_path / "e.safetensors")))
    assert isinstance(pre, PrecomputedTextEncoder)
    umt5 = _option("umt5_xxl", model)
    assert get_class(umt5._target_) is UMT5TextEncoder and umt5.text_len == 12
    assert umt5.checkpoint.startswith("hf://Wan-AI/")
