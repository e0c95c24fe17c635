"""Reason1TextEncoder on a tiny random Qwen2.5-VL folder against diffusers' own prompt encoding
of ``Cosmos2_5_PredictBasePipeline`` (same model, same tokenizer), fp32: max abs error 1e-5."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flashdreams.text_encoder.reason1 import Reason1TextEncoder

transformers = pytest.importorskip("transformers")

WORDS = "<pad> <|im_start|> <|im_end|> system user you are a helpful assistant who will " \
        "provide prompts to an image generator . red car drives in the rain"  # fmt: skip
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %} <|im_end|> {% endfor %}"
)


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS.split()))}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                unk_token="<unk>", chat_template=TEMPLATE)  # fmt: skip
    fast.save_pretrained(folder)
    return len(vocab)


def _tiny_qwen(folder, vocab: int) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=32, patch_size=2, spatial_merge_size=1,
                           temporal_patch_size=1, fullatt_block_indexes=[0]),
    )  # fmt: skip
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(folder)


def test_reason1_matches_diffusers_prompt_embeds(tmp_path):
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import (
        Cosmos2_5_PredictBasePipeline,
    )

    _tiny_qwen(tmp_path, _tokenizer(tmp_path))
    enc = Reason1TextEncoder(str(tmp_path), text_len=24, dtype="float32")
    assert enc.text_dim == 3 * 32  # all layers concatenated
    prompts = ["red car drives in the rain", "a car"]
    got = enc.encode(prompts, torch.device("cpu"), torch.float32)
    assert got.shape == (2, 24, 96)

    pipe = SimpleNamespace(tokenizer=enc.tokenizer, text_encoder=enc.model,
                           _execution_device=torch.device("cpu"))  # fmt: skip
    expected = Cosmos2_5_PredictBasePipeline._get_prompt_embeds(
        pipe, prompts, max_sequence_length=24, device=torch.device("cpu"), dtype=torch.float32
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # cached: the same prompt again does not run the model
    enc.model = None
    torch.testing.assert_close(enc.encode(prompts[:1], "cpu", torch.float32), got[:1])
