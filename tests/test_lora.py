"""LORA / LORA-V as published (nku-shengzheliu/SER30K): names, shapes, token order, selection, loading.

The expectations are read off the published code: ``pvt_local_final.py`` (trunk, Local_ReAttention),
``block.py`` (FuseBlock), ``model.py`` / ``model_V.py`` (fusion, position embedding, head) and
``main.py`` (the checkpoint format). Tiny trunks keep most tests to milliseconds.
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import textwrap

import pytest
import torch

from emotion_models import create_model
from emotion_models.lora import FuseBlock
from emotion_models.reattention import naive_selection_scores, select_tokens, selection_scores
from emotion_models.text import TEXT_LEN, make_tokenizer
from emotion_models.weights import load_weights, read_checkpoint

# 64 px: grids 16, 8, 4, 2 with reduction ratios 8, 4, 2, 1; alpha 1 keeps 64, 16, 4, 1 per head.
TINY_TRUNK = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(2, 2, 3, 2), mlp_ratios=(2, 2, 2, 2))
TINY = dict(img_size=64, alpha=1, trunk=TINY_TRUNK, hidden_dim=16, fuse_heads=2, fuse_mlp_dim=32,
            drop_path_rate=0.0, fuse_dropout=0.0)


def _tiny(name: str = "lora_v", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **kwargs}).eval()


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# --- the published architecture ---------------------------------------------------------------

def test_lora_v_has_the_published_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in create_model("lora_v", num_classes=7, img_size=448).state_dict().items()}
    expected = {
        "pos_embed": (1, 996, 768),                       # 1 + 3 globals + 8 * (64 + 32 + 20 + 8) locals
        "v_proj.weight": (768, 512),
        "head.weight": (7, 768),
        "vision_model.patch_embed1.proj.weight": (64, 3, 4, 4),
        "vision_model.patch_embed2.proj.weight": (128, 64, 2, 2),
        "vision_model.pos_embed1": (1, 56 * 56, 64),      # laid out for 224 px, as pvt_small.pth
        "vision_model.pos_embed3": (1, 14 * 14, 320),
        "vision_model.pos_embed4": (1, 7 * 7 + 1, 512),   # + the last stage's cls token
        "vision_model.cls_token": (1, 1, 512),
        "vision_model.cls_token1": (1, 1, 64),
        "vision_model.cls_token3": (1, 1, 320),
        "vision_model.local_proj1.0.weight": (64, 64),
        "vision_model.local_proj1.2.weight": (512, 64),
        "vision_model.global_proj2.2.weight": (512, 128),
        "vision_model.block1.2.attn.sr.weight": (64, 64, 8, 8),
        "vision_model.block1.0.attn.norm.weight": (64,),
        "vision_model.block3.5.attn.kv.weight": (640, 320),
        "vision_model.block2.3.mlp.fc1.weight": (1024, 128),  # MLP ratio 8
        "vision_model.block4.2.mlp.fc1.weight": (2048, 512),  # MLP ratio 4
        "vision_model.norm.weight": (512,),
        "fusion_model.attention_norm.weight": (768,),
        "fusion_model.attn.query.weight": (768, 768),
        "fusion_model.attn.out.weight": (768, 768),
        "fusion_model.ffn.fc1.weight": (3072, 768),
        "fusion_model.ffn_norm.bias": (768,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    # The last stage reduces nothing; no stage 4 cls token / projections; no block4 sr conv; no text.
    assert not [k for k in shapes if k.startswith(("vision_model.cls_token4", "vision_model.local_proj4",
                                                   "vision_model.block4.0.attn.sr", "text_model", "l_proj"))]
    assert sum(k.startswith("vision_model.block1.") and k.endswith("attn.q.weight") for k in shapes) == 3
    assert sum(k.startswith("vision_model.block3.") and k.endswith("attn.q.weight") for k in shapes) == 6


@pytest.mark.parametrize("locals_, alpha, tokens", [((1, 1, 1, 0), 8, 996), ((0, 1, 1, 0), 8, 483),
                                                    ((0, 0, 1, 0), 8, 226), ((0, 0, 0, 0), 8, 65),
                                                    ((1, 1, 1, 0), 4, 500)])
def test_token_counts_follow_the_published_formula(locals_, alpha, tokens):
    # model.py: 1 + sum(locals) + alpha * (8 + sum of [64, 32, 20] over the selecting stages).
    model = create_model("lora_v", img_size=224, alpha=alpha, locals=locals_)
    assert model.num_visual_tokens == tokens
    assert model.pos_embed.shape == (1, tokens, 768)


def test_trunk_output_at_448_px_has_996_tokens():
    torch.manual_seed(0)
    trunk = create_model("lora_v", img_size=448).vision_model.eval()
    with torch.no_grad():
        assert trunk(torch.randn(1, 3, 448, 448)).shape == (1, 996, 512)


def test_image_too_small_for_the_selection_is_refused():
    with pytest.raises(ValueError, match="img_size=32"):
        create_model("lora_v", img_size=32)            # stage 1: 8x8 tokens, one 8x8 reduced cell
    with pytest.raises(ValueError, match="smaller alpha"):
        create_model("lora_v", img_size=64, alpha=8)   # stage 1: 256 tokens < 8 * 64


def test_locals_must_leave_the_last_stage_to_its_cls_token_and_need_two_blocks():
    with pytest.raises(ValueError, match="locals"):
        create_model("lora_v", locals=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="two blocks"):
        create_model("lora_v", img_size=64, alpha=1, trunk={"depths": (1, 2, 2, 2)})


# --- local re-attention ------------------------------------------------------------------------

def _maps(depth: int, rows: int, cols: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, rows, cols, generator=g).mul(3).softmax(-1) for _ in range(depth)]


def test_selection_rule_by_hand_for_two_and_three_blocks():
    a0, a1, a2 = _maps(3, 9, 4)
    # Published: i=1 -> A1 @ A0ᵀ; i=2 (even) -> A2ᵀ @ previous. Row 0, cls column dropped.
    torch.testing.assert_close(selection_scores([a0, a1], last=False),
                               (a1 @ a0.transpose(-2, -1))[..., 0, 1:].double())
    torch.testing.assert_close(selection_scores([a0, a1, a2], last=False),
                               (a2.transpose(-2, -1) @ a1 @ a0.transpose(-2, -1))[..., 0, 1:].double())
    b0, b1, b2 = _maps(3, 5, 5)
    torch.testing.assert_close(selection_scores([b0, b1, b2], last=True), (b2 @ b1 @ b0)[..., 0, 1:].double())
    torch.testing.assert_close(selection_scores([a0], last=False), a0[..., 0, 1:].double())


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("last", [False, True])
def test_vector_chain_equals_the_published_product(depth, last):
    maps = [m.double() for m in _maps(depth, 17, 17 if last else 5, seed=depth)]
    torch.testing.assert_close(selection_scores(maps, last), naive_selection_scores(maps, last))


def test_select_tokens_keeps_each_heads_top_k_in_descending_order():
    tokens = torch.arange(1 + 6, dtype=torch.float32).view(1, 7, 1).expand(1, 7, 2)  # token i carries value i
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.0, 0.2], [0.5, 0.4, 0.3, 0.2, 0.1, 0.6]]])
    picked = select_tokens(tokens, scores, 2)
    # head 0: patches 1 (0.9) then 3 (0.8); head 1: 5 then 0; +1 for the cls token in front.
    assert picked[0, :, 0].tolist() == [2.0, 4.0, 6.0, 1.0]


def test_trunk_token_order_globals_reversed_then_locals_flipped():
    """Rebuild the published output from each stage's tokens: [cls4, g3, g2, g1] + flip(l1, l2, l3, l4)."""
    model = _tiny()
    trunk = model.vision_model
    after = {}
    for n in range(1, 5):
        last_block = getattr(trunk, f"block{n}")[-1]
        last_block.register_forward_hook(functools.partial(lambda n, mod, inp, out: after.__setitem__(n, out), n))
    images = _images(1)
    with torch.no_grad():
        out = trunk(images)
        globals_, locals_ = [], []
        for n in range(1, 5):
            x, probs = after[n]
            blocks = getattr(trunk, f"block{n}")
            maps = _stage_maps(trunk, images, n)   # every block's attention map of stage n
            scores = naive_selection_scores([m.double() for m in maps], last=n == 4)
            k = trunk.selected_per_head(n - 1)
            picked = select_tokens(x, scores, k)
            if n < 4:
                picked = getattr(trunk, f"local_proj{n}")(picked)
                globals_.append(getattr(trunk, f"global_proj{n}")(x[:, 0]))
            else:
                globals_.append(x[:, 0])
            locals_.append(picked)
            assert len(blocks) == len(maps)
        expected = trunk.norm(torch.cat([torch.stack(globals_[::-1], 1), torch.cat(locals_, 1).flip(1)], 1))
    torch.testing.assert_close(out, expected)
    assert out.shape == (1, model.num_visual_tokens, 32)


def _stage_maps(trunk, images: torch.Tensor, stage: int) -> list[torch.Tensor]:
    maps: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_hook(lambda mod, inp, out: maps.append(out[1]))
             for block in getattr(trunk, f"block{stage}")]
    try:
        trunk(images)
    finally:
        for h in hooks:
            h.remove()
    return maps


def test_forward_peak_memory_at_448_px_stays_small():
    """LORA-V's forward at 448 px never forms a 12545 x 12545 product (630 MB per map in fp32)."""
    code = textwrap.dedent("""
        import resource, torch
        from emotion_models import create_model
        torch.manual_seed(0)
        model = create_model("lora_v", img_size=448).eval()
        x = torch.randn(2, 3, 448, 448)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            model(x)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_gib = float(out.stdout.strip().splitlines()[-1])
    assert growth_gib < 1.0, f"forward grew the peak RSS by {growth_gib:.2f} GiB"


# --- fusion ------------------------------------------------------------------------------------

def test_fuse_block_returns_token_zero_and_attends_to_every_token():
    torch.manual_seed(0)
    block = FuseBlock(dim=16, heads=2, mlp_dim=32, drop=0.0).eval()
    x = torch.randn(2, 5, 16)
    y = x.clone()
    y[:, -1] = torch.randn(2, 16)  # a padded text position still takes part (the published block has no mask)
    with torch.no_grad():
        a, b = block(x), block(y)
    assert a.shape == (2, 16)
    assert not torch.allclose(a, b)
    # By hand: pre-norm attention, residual, pre-norm MLP, residual; token 0 out.
    with torch.no_grad():
        h = block.attention_norm(x)
        q, k, v = (m(h).view(2, 5, 2, 8).transpose(1, 2) for m in (block.attn.query, block.attn.key, block.attn.value))
        att = ((q @ k.transpose(-2, -1)) / 8 ** 0.5).softmax(-1) @ v
        x1 = x + block.attn.out(att.transpose(1, 2).reshape(2, 5, 16))
        x2 = x1 + block.ffn.fc2(torch.nn.functional.gelu(block.ffn.fc1(block.ffn_norm(x1))))
    torch.testing.assert_close(a, x2[:, 0])


def test_no_weight_decay_names_position_embeddings_and_cls_tokens():
    model = _tiny()
    names = dict(model.named_parameters())
    exempt = model.no_weight_decay()
    assert exempt <= names.keys()
    assert {"pos_embed", "vision_model.cls_token", "vision_model.cls_token1", "vision_model.pos_embed4"} <= exempt
    assert not [n for n in exempt if n.endswith("weight")]


# --- checkpoints and weights -------------------------------------------------------------------

def _published_checkpoint(model: torch.nn.Module, path, **extra) -> None:
    """What SER30K's main.py saves every epoch."""
    args = argparse.Namespace(alpha=1, locals=[1, 1, 1, 0], input_size=64, nb_classes=7, lr=3e-5, model="pvt_small")
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "lr_scheduler": {"t_initial": 50}, "epoch": 49, "scaler": {"scale": 65536.0}, "args": args,
                **extra}, path)


def test_published_checkpoint_format_loads_whole_and_reproduces_logits(tmp_path):
    source, target = _tiny(seed=1), _tiny(seed=2)
    path = tmp_path / "checkpoint_v.pth"
    _published_checkpoint(source, path)
    report = load_weights(target, path)
    assert report.target == "" and report.loaded == len(source.state_dict()) == report.in_file
    assert not report.skipped_head and not report.new
    with torch.no_grad():
        torch.testing.assert_close(target(_images())["logits"], source(_images())["logits"])
    assert read_checkpoint(path)["args"].alpha == 1  # the one allowlisted type comes back as itself


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny().state_dict(), "hook": functools.partial(print, "hi")}, path)
    with pytest.raises(ValueError, match="evil.pth: not a readable weights file"):
        load_weights(_tiny(), path)


def test_imagenet_pvt_small_file_initialises_the_whole_trunk(tmp_path):
    """pvt_small.pth: the trunk's names without LORA's additions, plus a 1000-class head."""
    source = _tiny(seed=3).vision_model
    lora_only = ("cls_token1", "cls_token2", "cls_token3", "local_proj", "global_proj")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(lora_only)}
    state |= {"head.weight": torch.randn(1000, 32), "head.bias": torch.zeros(1000)}
    torch.save({"model": state}, tmp_path / "pvt_small.pth")

    model = _tiny(seed=4)
    report = load_weights(model, tmp_path / "pvt_small.pth")
    assert report.target == "vision_model"
    assert report.loaded == len(state) - 2
    assert report.skipped_head == ["head.bias", "head.weight"]
    assert report.new and all(k.startswith(lora_only) for k in report.new)
    own = model.vision_model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("head"))
    # The same file straight into the trunk module fits it the same way.
    trunk = _tiny(seed=5).vision_model
    assert load_weights(trunk, tmp_path / "pvt_small.pth").loaded == len(state) - 2
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in state.items() if not k.startswith("head"))


def test_partial_fit_stops_with_what_is_missing_and_unexpected(tmp_path):
    state = _tiny().state_dict()
    state.pop("vision_model.block2.1.attn.q.weight")
    state["vision_model.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError) as err:
        load_weights(_tiny(), tmp_path / "partial.pth")
    message = str(err.value)
    assert "partial.pth: does not fit" in message and "\n" not in message
    assert "missing 1: vision_model.block2.1.attn.q.weight" in message
    assert "unexpected 1: vision_model.extra.weight" in message


def test_a_head_of_another_size_is_skipped_and_said(tmp_path):
    torch.save(_tiny(num_classes=5).state_dict(), tmp_path / "five.pth")
    model = _tiny(num_classes=7)
    head = model.head.weight.clone()
    report = load_weights(model, tmp_path / "five.pth")
    assert report.skipped_head == ["head.bias", "head.weight"]
    assert "skipped the classifier head" in report.summary()
    assert torch.equal(model.head.weight, head)


def test_other_trunk_widths_do_not_fit(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="other shape"):
        load_weights(_tiny(trunk={**TINY_TRUNK, "mlp_ratios": (4, 2, 2, 2)}), tmp_path / "tiny.pth")


# --- the text branch ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT in the Hugging Face folder layout (no download)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "so", "happy", "today", "grr", "!", "hap", "##py"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=5, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_bert_tokenizer_as_published(bert_dir):
    ids, mask = make_tokenizer(f"bert:{bert_dir}")(["So HAPPY today!", None])
    assert ids.shape == mask.shape == (2, TEXT_LEN)
    # [CLS]=2 so happy today ! [SEP]=3, zero-padded; lower-cased first.
    assert ids[0, :6].tolist() == [2, 5, 6, 7, 9, 3] and not ids[0, 6:].any()
    assert mask[0].tolist() == [1] * 6 + [0] * (TEXT_LEN - 6)
    assert ids[1, :2].tolist() == [2, 3] and mask[1].sum() == 2


def test_lora_with_bert_uses_its_last_four_layers_frozen(bert_dir):
    torch.manual_seed(0)
    model = create_model("lora", text_encoder=f"bert:{bert_dir}", **TINY).eval()
    names = dict(model.named_parameters())
    assert "text_model.embeddings.word_embeddings.weight" in names
    assert "text_model.encoder.layer.4.output.LayerNorm.weight" in names and "text_model.pooler.dense.weight" in names
    assert names["l_proj.weight"].shape == (16, 24)
    assert model.pos_embed.shape == (1, model.num_visual_tokens + TEXT_LEN, 16)
    assert not any(p.requires_grad for n, p in names.items() if n.startswith("text_model."))

    ids, mask = (torch.from_numpy(a) for a in make_tokenizer(f"bert:{bert_dir}")(["so happy", "grr !"]))
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        features = (hidden[-1] + hidden[-2] + hidden[-3] + hidden[-4]) / 4
        fused = torch.cat([model.v_proj(model.vision_model(_images())), model.l_proj(features)], 1)
        expected = model.head(model.fusion_model(fused + model.pos_embed))
        torch.testing.assert_close(model(_images(), ids, mask)["logits"], expected)

    model.train()
    loss = model(_images(), ids, mask)["logits"].sum()
    loss.backward()
    assert names["l_proj.weight"].grad is not None
    assert all(p.grad is None for n, p in names.items() if n.startswith("text_model."))


def test_missing_bert_folder_names_the_flag(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="--text-encoder bert:PATH"):
        create_model("lora", text_encoder=f"bert:{tmp_path / 'nowhere'}", **TINY)


def test_lora_with_byte_text_uses_the_text_and_lora_v_refuses_it():
    model = _tiny("lora", text_encoder="bytes")
    tokenize = make_tokenizer("bytes", TEXT_LEN)
    images = _images()
    with torch.no_grad():
        a = model(images, *(torch.from_numpy(t) for t in tokenize(["so happy", "so happy"])))["logits"]
        b = model(images, *(torch.from_numpy(t) for t in tokenize(["grr", "grr"])))["logits"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="no text branch"):
        create_model("lora_v", text_encoder="bytes", **TINY)
