"""LORA / LORA-V, local re-attention and the text branch (tiny models at 64 px, CPU, seconds)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerStage

from emotion_models import create_model
from emotion_models.lora import QueryStage
from emotion_models.reattention import gather_tokens, naive_rollout, query_rollout, select_topk
from emotion_models.text import (
    CLS_ID, EOS_ID, PAD_ID, ByteTextEncoder, build_text_encoder, make_tokenizer, tokenize, tokenize_numpy,
)
from emotion_models.weights import load_weights

# 64 px: stage feature maps 16x16, 8x8, 4x4, 2x2 with the default sr_ratios (8, 4, 2, 1).
TINY = dict(img_size=64, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
            fusion_dim=32, fusion_heads=2, max_text_len=32, drop_path_rate=0.0)
TEXTS = ["so happy today", "grr ваш 😠"]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **kwargs})


@pytest.mark.parametrize("name", ["lora", "lora_v"])
def test_forward_shapes_and_every_parameter_gets_a_gradient(name, images):
    model = _model(name).train()
    ids, mask = tokenize(TEXTS, 16)
    logits = model(images, ids, mask)["logits"]
    assert logits.shape == (2, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None or not p.grad.any()] == []
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert {"query_proj", "local_proj", "fusion", "head"} <= names
    assert sum(n.endswith("query_token") for n, _ in model.named_parameters()) == 4
    assert ("text_encoder" in names) == (name == "lora")


def test_text_is_used_by_lora_and_ignored_by_lora_v(images):
    lora, lora_v = _model("lora").eval(), _model("lora_v").eval()
    with torch.no_grad():
        a, b = (lora(images, *tokenize([t, t], 16))["logits"] for t in TEXTS)
        assert not torch.allclose(a, b)
        torch.testing.assert_close(lora_v(images, *tokenize(TEXTS, 16))["logits"], lora_v(images)["logits"])


@pytest.mark.parametrize("feat_size, sr", [((6, 6), 1), ((8, 8), 2), ((16, 16), 4), ((11, 10), 4)])
def test_fast_rollout_selects_the_same_tokens_as_the_naive_product(feat_size, sr):
    gen = torch.Generator().manual_seed(sr)
    height, width = feat_size
    keys = 1 + (height // sr) * (width // sr)
    attns = [torch.randn(2, 3, 1 + height * width, keys, generator=gen).mul(3).softmax(-1) for _ in range(4)]

    fast, naive = query_rollout(attns, feat_size, sr), naive_rollout(attns, feat_size, sr)
    assert fast.shape == (2, 3, height * width)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    k = min(3 * sr * sr, height * width // 2)
    assert torch.equal(select_topk(fast, k).sort(-1).values, select_topk(naive, k).sort(-1).values)


def test_rollout_of_a_real_stage_with_spatial_reduction(images):
    model = _model("lora_v")
    stage = model.stages[0]  # 16x16 tokens, sr 8: 1 query + 2x2 reduced keys
    fmap, tokens, attns = stage(model.patch_embed(images))
    assert fmap.shape == (2, 16, 16, 16) and tokens.shape == (2, 1 + 256, 16)
    assert attns[0].shape == (2, 1, 257, 5) and not attns[0].requires_grad
    torch.testing.assert_close(query_rollout(attns, (16, 16), 8), naive_rollout(attns, (16, 16), 8),
                               atol=1e-5, rtol=0)


def test_gathered_tokens_carry_gradient_and_topk_is_capped():
    tokens = torch.randn(2, 10, 4, requires_grad=True)
    row = torch.arange(20.0).reshape(2, 1, 10).expand(2, 3, 10)
    idx = select_topk(row, 3)
    assert idx.shape == (2, 3, 3) and idx[0, 0].tolist() == [9, 8, 7]
    assert select_topk(row, 50).shape == (2, 3, 10)  # capped at the token count
    picked = gather_tokens(tokens, idx)
    assert picked.shape == (2, 9, 4)
    torch.testing.assert_close(picked[1, 3], tokens[1, 9])
    picked.sum().backward()
    assert tokens.grad[:, 9].eq(3).all() and tokens.grad[:, :7].eq(0).all()  # 3 heads picked token 9


@pytest.mark.parametrize("alpha, locals_, per_stage", [
    # heads x min(alpha * sr^2, tokens) with tokens 256, 64, 16, 4 and sr 8, 4, 2, 1
    (1, (1, 1, 1, 0), [1 * 64, 2 * 16, 3 * 4, 4 * 1]),
    (8, (1, 1, 1, 0), [1 * 256, 2 * 64, 3 * 16, 4 * 4]),   # alpha * sr^2 exceeds every stage: capped
    (2, (0, 1, 0, 0), [2 * 32, 4 * 2]),                     # the last stage always re-attends
])
def test_local_token_count_is_alpha_sr2_per_head_capped(alpha, locals_, per_stage, images):
    model = _model("lora_v", alpha=alpha, locals=locals_)
    reattending = [isinstance(s, QueryStage) for s in model.stages]
    assert reattending == [bool(f) or i == 3 for i, f in enumerate(locals_)]
    plain = [s for s, r in zip(model.stages, reattending) if not r]
    assert all(isinstance(s, PyramidVisionTransformerStage) for s in plain)  # timm's own, fused SDPA
    tokens = model.forward_features(images)
    assert tokens.shape == (2, len(per_stage) + sum(per_stage), 32)


def test_tokenizer_pads_truncates_and_keeps_utf8():
    ids, mask = tokenize(["ab", "abcdef", None], 5)
    assert ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist() == [CLS_ID, ord("a") + 3, ord("b") + 3, EOS_ID, PAD_ID]
    assert mask[0].tolist() == [1, 1, 1, 1, 0]
    assert ids[1].tolist() == [CLS_ID, ord("a") + 3, ord("b") + 3, ord("c") + 3, EOS_ID]
    assert ids[2].tolist()[:3] == [CLS_ID, EOS_ID, PAD_ID]

    text = "naïve 😀 ваш"
    ids, mask = tokenize([text], 40)
    body = ids[0][mask[0].bool()][1:-1] - 3
    assert bytes(body.tolist()).decode("utf-8") == text and len(body) > len(text)
    np_ids, np_mask = tokenize_numpy([text], 40)
    assert np.array_equal(np_ids, ids.numpy()) and np.array_equal(np_mask, mask.numpy())
    assert np.array_equal(make_tokenizer("bytes", 40)([text])[0], np_ids)
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["x"], 1)


def test_padded_positions_never_change_the_output(images):
    model = _model("lora").eval()
    short_ids, short_mask = tokenize(TEXTS, 18)  # fits both texts: no truncation
    long_ids, long_mask = tokenize(TEXTS, 32)
    garbage = long_ids.clone()
    garbage[long_mask == 0] = torch.randint(3, 259, (int((long_mask == 0).sum()),))
    with torch.no_grad():
        reference = model(images, short_ids, short_mask)["logits"]
        torch.testing.assert_close(model(images, long_ids, long_mask)["logits"], reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(images, garbage, long_mask)["logits"], reference, atol=1e-5, rtol=0)

    encoder = ByteTextEncoder(16, max_len=32).eval()
    with torch.no_grad():
        out_short, out_long = encoder(short_ids, short_mask), encoder(garbage, long_mask)
    torch.testing.assert_close(out_long[:, :18][short_mask.bool()], out_short[short_mask.bool()],
                               atol=1e-5, rtol=0)


def test_lora_state_dict_round_trip_reproduces_outputs(tmp_path, images):
    ids, mask = tokenize(TEXTS, 16)
    source = _model("lora").eval()
    path = tmp_path / "lora.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    fresh = create_model("lora", **TINY).eval()
    with torch.no_grad():
        expected = source(images, ids, mask)["logits"]
        assert not torch.allclose(fresh(images, ids, mask)["logits"], expected)
        torch.manual_seed(1)
        loaded = create_model("lora", weights=str(path), **TINY).eval()
        torch.testing.assert_close(loaded(images, ids, mask)["logits"], expected)


def test_timm_pvt_v2_trunk_loads_into_the_visual_part(tmp_path, images):
    timm_model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=0).eval()
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(timm_model.state_dict(), path)
    b0 = dict(TINY, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8))
    model = _model("lora", **b0).eval()

    report = load_weights(model, path)
    assert report.unexpected == [] and report.mismatched == []
    assert report.loaded == len(timm_model.state_dict())
    new = ("query_proj.", "local_proj.", "fusion.", "norm.", "head.", "text_encoder.", "text_proj.")
    assert all(k.startswith(new) or k in ("pos_embed", "type_embed") or k.endswith(".query_token")
               for k in report.missing)
    # A stage without re-attention is timm's own: same output as pvt_v2_b0's first stage.
    plain = _model("lora_v", **b0, locals=(0, 0, 0, 0), weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.stages[0](plain.patch_embed(images)),
                                   timm_model.stages[0](timm_model.patch_embed(images)))


def test_bad_configurations_raise_clear_errors(images):
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("gpt", 16, 8)
    with pytest.raises(ValueError, match="no text branch"):
        create_model("lora_v", text_encoder="bytes", **TINY)
    with pytest.raises(ValueError, match="width 48 is not divisible by its 5"):
        create_model("lora_v", **dict(TINY, num_heads=(1, 2, 5, 8)))
    with pytest.raises(ValueError, match="too small"):
        create_model("lora_v", **dict(TINY, img_size=16))
    with pytest.raises(ValueError, match="built for img_size=96"):
        _model("lora_v", img_size=96)(images)  # 64 px has fewer tokens than k at 96 px
    model = _model("lora")
    with pytest.raises(ValueError, match="max_text_len=32"):
        model(images, *tokenize(TEXTS, 40))


def test_bert_encoder_needs_transformers_and_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers"):
        build_text_encoder(f"bert:{tmp_path}", 16, 8)


def test_bert_encoder_from_a_local_directory(tmp_path, images):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_text_encoder(f"bert:{tmp_path / 'missing'}", 16, 8)
    config = transformers.BertConfig(vocab_size=300, hidden_size=24, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "so", "happy", "today"]) + "\n")
    transformers.BertTokenizer(str(vocab))  # v4: vocab_file, v5: vocab.save_pretrained(tmp_path)
    model = _model("lora", text_encoder=f"bert:{tmp_path}").eval()
    ids, mask = model.text_encoder.tokenizer()(TEXTS)
    assert ids.shape == mask.shape == (2, TINY["max_text_len"]) and ids[0, 1:4].tolist() == [5, 6, 7]
    with torch.no_grad():
        logits = model(images, torch.from_numpy(ids), torch.from_numpy(mask))["logits"]
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # frozen as in the paper
