"""Text branch for LORA: a local BERT-base-uncased as published, or a byte-level encoder offline.

Published (nku-shengzheliu/SER30K ``dataset.py`` / ``model.py``): the sticker text is lower-cased,
WordPiece-tokenized by BERT's uncased vocabulary into ``[CLS] tokens[:28] [SEP]``, zero-padded to 30
ids with a mask of 1 on real tokens; the features are the mean of BERT's last four encoder layers,
computed without gradient (BERT is frozen). The Hugging Face ``BertModel`` has the published
``pytorch_pretrained_bert`` parameter names, so a LORA checkpoint's ``text_model.*`` loads into it.
``transformers`` is imported lazily and only ever reads a local folder (``bert:PATH``).

Offline (the demo and tests, ``"bytes"``): UTF-8 bytes need no vocabulary file and never meet an
unknown token. Ids are ``byte + 3`` with ``PAD_ID = 0``, ``CLS_ID = 1``, ``EOS_ID = 2``; a sequence is
``[CLS] bytes... [EOS] [PAD]...`` truncated (bytes dropped, CLS/EOS kept) and padded to ``max_len``;
a small transformer trained from scratch encodes it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from emotion_models.errors import ModelConfigError

__all__ = [
    "PAD_ID", "CLS_ID", "EOS_ID", "VOCAB_SIZE", "TEXT_LEN", "BYTE_TEXT_DIM", "tokenize", "tokenize_numpy",
    "key_padding_mask", "ByteTextEncoder", "build_text_model", "text_features", "make_tokenizer",
]

PAD_ID, CLS_ID, EOS_ID = 0, 1, 2
TEXT_LEN = 30           # the published query length
BYTE_TEXT_DIM = 128     # width of the offline byte encoder
_BYTE_OFFSET = 3
VOCAB_SIZE = 256 + _BYTE_OFFSET

TokenizeFn = Callable[[Sequence[Optional[str]]], tuple[np.ndarray, np.ndarray]]


def tokenize_numpy(texts: Sequence[Optional[str]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level ids and attention mask, both int64 ``(len(texts), max_len)``; ``None`` = ``""``.

    The numpy variant is for Ray Data ``map_batches`` transforms (no torch tensors in batches).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for CLS and EOS), got {max_len}")
    ids = np.full((len(texts), max_len), PAD_ID, dtype=np.int64)
    for row, text in enumerate(texts):
        body = np.frombuffer((text or "").encode("utf-8"), dtype=np.uint8)[: max_len - 2]
        ids[row, 0] = CLS_ID
        ids[row, 1:1 + len(body)] = body.astype(np.int64) + _BYTE_OFFSET
        ids[row, 1 + len(body)] = EOS_ID
    return ids, (ids != PAD_ID).astype(np.int64)


def tokenize(texts: Sequence[Optional[str]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tokenize_numpy` as LongTensors ``(ids, attention_mask)``."""
    ids, mask = tokenize_numpy(texts, max_len)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` mask (1 = real) -> boolean ``(B, 1, 1, L)`` SDPA mask (True = may attend).

    A row without any real token would give an all ``-inf`` softmax (NaN); such rows attend to
    every position instead. Their outputs are meaningless and must be masked downstream
    (:class:`emotion_models.lora.Lora` does: its visual tokens are never masked).
    """
    keep = mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class ByteTextEncoder(nn.Module):
    """Small pre-norm Transformer over byte ids, trained from scratch; returns ``(B, L, dim)``."""

    def __init__(self, dim: int, depth: int = 2, heads: int = 4, max_len: int = 32,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.embed = nn.Embedding(VOCAB_SIZE, dim, padding_idx=PAD_ID)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList([
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=drop_rate)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"text has {length} tokens; ByteTextEncoder was built for max_len={self.max_len}")
        attn_mask = key_padding_mask(ids != PAD_ID if mask is None else mask)
        x = self.embed(ids) + self.pos_embed[:, :length]
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def tokenizer(self) -> TokenizeFn:
        """The matching tokenizer: texts -> numpy ``(ids, mask)`` padded to ``max_len``."""
        return make_tokenizer("bytes", self.max_len)


class BertTokenizeText:
    """Picklable texts -> numpy ``(ids, mask)`` as published: lower-cased, ``[CLS] .. [SEP]``, zero-padded."""

    def __init__(self, path: str, max_len: int = TEXT_LEN) -> None:
        self.path, self.max_len = path, max_len
        self._tokenizer = None

    def __call__(self, texts: Sequence[Optional[str]]) -> tuple[np.ndarray, np.ndarray]:
        if self._tokenizer is None:
            from transformers import BertTokenizer

            self._tokenizer = BertTokenizer.from_pretrained(self.path, do_lower_case=True, local_files_only=True)
        out = self._tokenizer([(t or "").lower().strip() for t in texts], padding="max_length", truncation=True,
                              max_length=self.max_len, return_tensors="np", return_token_type_ids=False)
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

    def __getstate__(self) -> dict:
        return {"path": self.path, "max_len": self.max_len, "_tokenizer": None}


def _require_bert_dir(path: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("--text-encoder bert:PATH needs the transformers package: "
                          "pip install 'emotion-ray[bert]'") from None
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: BERT folder not found (--text-encoder bert:PATH reads a local "
                                f"bert-base-uncased folder; nothing is downloaded)")
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"{folder / 'vocab.txt'}: missing; --text-encoder bert:PATH needs a Hugging Face "
                                f"bert-base-uncased folder (config.json, vocab.txt, weights)")


def _parse_spec(spec: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if spec is None:
        return None, None
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bert:") and len(spec) > len("bert:"):
        return "bert", spec[len("bert:"):]
    raise ModelConfigError(f"unknown text encoder {spec!r}; use 'bert:PATH' (a local BERT folder) or 'bytes'")


def build_text_model(spec: str, max_len: int = TEXT_LEN) -> tuple[str, nn.Module, int]:
    """``(kind, module, feature width)``: ``"bert:PATH"`` -> Hugging Face ``BertModel`` from the folder;
    ``"bytes"`` -> :class:`ByteTextEncoder` of width :data:`BYTE_TEXT_DIM`."""
    kind, path = _parse_spec(spec)
    if kind == "bytes":
        return kind, ByteTextEncoder(BYTE_TEXT_DIM, max_len=max_len), BYTE_TEXT_DIM
    if kind != "bert":
        raise ValueError("a text model needs a spec ('bert:PATH' or 'bytes')")
    _require_bert_dir(path)
    from transformers import BertModel

    bert = BertModel.from_pretrained(path, local_files_only=True)
    return kind, bert, bert.config.hidden_size


def text_features(kind: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  num_layers: int = 4) -> torch.Tensor:
    """``(B, L, D)`` text tokens: BERT's last ``num_layers`` encoder layers averaged, or the byte encoder's."""
    if kind == "bert":
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return torch.stack(out.hidden_states[-num_layers:]).mean(0)
    return model(ids, mask)


def make_tokenizer(spec: Optional[str], max_len: int = TEXT_LEN) -> Optional[TokenizeFn]:
    """The tokenizer for ``spec`` without building the model (for Ray Data batch transforms)."""
    kind, path = _parse_spec(spec)
    if kind == "bytes":
        return functools.partial(tokenize_numpy, max_len=max_len)
    if kind == "bert":
        _require_bert_dir(path)
        return BertTokenizeText(path, max_len)
    return None
