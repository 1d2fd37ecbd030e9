"""The optional KV cache and padding mask of the decoder (used by generation only)."""

import pytest
import torch

from pretrain.model.transformer import build_model

from .conftest import tiny_config


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_incremental_decoding_matches_full_forward(ffn):
    cfg = tiny_config(ffn)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache()
        # A prompt of 5 tokens, then a chunk of 3, then one token at a time.
        parts = [model(ids[:, :5], kv_cache=cache).logits]
        parts.append(model(ids[:, 5:8], kv_cache=cache).logits)
        for i in range(8, 14):
            parts.append(model(ids[:, i : i + 1], kv_cache=cache).logits)
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_left_padding_with_mask_matches_unpadded_rows():
    cfg = tiny_config("moe")
    model = build_model(cfg).eval()
    a = torch.randint(1, cfg.vocab_size, (1, 9))
    b = torch.randint(1, cfg.vocab_size, (1, 5))
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat((a, torch.cat((pad, b), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    nxt = torch.randint(1, cfg.vocab_size, (2, 3))
    with torch.no_grad():
        cache = model.new_kv_cache()
        first = model(batch, kv_cache=cache, attention_mask=mask).logits
        steps = [model(nxt[:, i : i + 1], kv_cache=cache).logits for i in range(3)]
        ref_a = model(torch.cat((a, nxt[:1]), dim=1)).logits
        ref_b = model(torch.cat((b, nxt[1:]), dim=1)).logits
    got = torch.cat((first, *steps), dim=1)
    assert torch.isfinite(got).all()  # padding query rows must not produce NaN
    torch.testing.assert_close(got[0], ref_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, 4:], ref_b[0], rtol=0, atol=1e-5)


def test_cache_select_keeps_rows():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 6))
    with torch.no_grad():
        cache = model.new_kv_cache()
        model(ids[:, :5], kv_cache=cache)
        cache.select(torch.tensor([2, 0]))
        got = model(ids[[2, 0], 5:], kv_cache=cache).logits[:, -1]
        ref = model(ids[[2, 0]]).logits[:, -1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_cache_refuses_growth_past_context_and_non_causal_models():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.zeros(1, cfg.max_seq_len, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    nc = build_model(tiny_config(causal=False)).eval()
    with pytest.raises(ValueError, match="causal"):
        nc(torch.zeros(1, 3, dtype=torch.long), kv_cache=nc.new_kv_cache())
