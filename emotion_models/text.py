"""Text branch for LORA: a byte-level tokenizer and encoder, or a local Hugging Face BERT.

Sticker texts (SER30K's OCR'd captions) are short and multilingual, so the default is byte-level:
UTF-8 bytes need no vocabulary file and never meet an unknown token. Ids are ``byte + 3`` with
``PAD_ID = 0``, ``CLS_ID = 1``, ``EOS_ID = 2``; a sequence is ``[CLS] bytes... [EOS] [PAD]...``
truncated (bytes dropped, CLS/EOS kept) and padded to ``max_len``; the mask is 1 on real tokens.

``BertTextEncoder`` (the paper's choice) loads ``transformers`` lazily from a local directory only,
so the package imports with torch + timm + numpy alone.
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

__all__ = [
    "PAD_ID", "CLS_ID", "EOS_ID", "VOCAB_SIZE", "tokenize", "tokenize_numpy", "key_padding_mask",
    "ByteTextEncoder", "BertTextEncoder", "build_text_encoder", "make_tokenizer",
]

PAD_ID, CLS_ID, EOS_ID = 0, 1, 2
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


class _BertTokenizer:
    """Picklable texts -> numpy ``(ids, mask)`` with a local Hugging Face tokenizer (loaded lazily)."""

    def __init__(self, path: str, max_len: int) -> None:
        self.path, self.max_len = path, max_len
        self._tokenizer = None

    def __call__(self, texts: Sequence[Optional[str]]) -> tuple[np.ndarray, np.ndarray]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        out = self._tokenizer([t or "" for t in texts], padding="max_length", truncation=True,
                              max_length=self.max_len, return_tensors="np")
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

    def __getstate__(self) -> dict:
        return {"path": self.path, "max_len": self.max_len, "_tokenizer": None}


def _require_local_dir(path: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("text_encoder='bert:PATH' needs the transformers package: "
                          "pip install 'emotion-ray[bert]'") from None
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: BERT model directory not found (only local files are used)")


class BertTextEncoder(nn.Module):
    """Hugging Face BERT from a local directory; mean of the last ``num_layers`` hidden states.

    As in the paper's code the average of the last four layers is used and BERT is frozen by
    default (``freeze=True``): only the projection after it trains.
    """

    def __init__(self, path: str, max_len: int = 32, num_layers: int = 4, freeze: bool = True) -> None:
        super().__init__()
        _require_local_dir(path)
        from transformers import AutoModel

        self.path, self.max_len, self.num_layers = path, max_len, num_layers
        self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        self.dim = self.bert.config.hidden_size
        self.freeze = freeze
        self.bert.requires_grad_(not freeze)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):  # frozen: keep no graph
            out = self.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return torch.stack(out.hidden_states[-self.num_layers:]).mean(0)

    def tokenizer(self) -> TokenizeFn:
        return _BertTokenizer(self.path, self.max_len)


def _parse_spec(spec: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if spec is None:
        return None, None
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bert:") and len(spec) > len("bert:"):
        return "bert", spec[len("bert:"):]
    raise ValueError(f"unknown text encoder {spec!r}; use 'bytes', 'bert:PATH' or None")


def build_text_encoder(spec: Optional[str], dim: int, max_len: int) -> Optional[nn.Module]:
    """``"bytes"`` -> :class:`ByteTextEncoder` (width ``dim``), ``"bert:PATH"`` -> :class:`BertTextEncoder`,
    ``None`` -> ``None``. Every encoder has ``.dim`` (output width) and ``.tokenizer()``."""
    kind, path = _parse_spec(spec)
    if kind == "bytes":
        return ByteTextEncoder(dim, max_len=max_len)
    if kind == "bert":
        return BertTextEncoder(path, max_len=max_len)
    return None


def make_tokenizer(spec: Optional[str], max_len: int) -> Optional[TokenizeFn]:
    """The tokenizer matching ``build_text_encoder(spec, ...)`` without building the encoder
    (for Ray Data batch transforms); ``None`` for ``spec=None``."""
    kind, path = _parse_spec(spec)
    if kind == "bytes":
        return functools.partial(tokenize_numpy, max_len=max_len)
    if kind == "bert":
        _require_local_dir(path)
        return _BertTokenizer(path, max_len)
    return None

