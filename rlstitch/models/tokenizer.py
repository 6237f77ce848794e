"""A word-level tokenizer in open_clip's id layout, for the tiny world's small vocabulary."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

SPECIALS = ["<pad>", "<unk>"]


class WordTokenizer:
    """Lower-cased words -> ids; <sot> and <eot> come last so <eot> has the highest id (open_clip's argmax pooling)."""

    def __init__(self, words: Sequence[str], context_length: int = 16):
        self.words = list(words)
        self.vocab = SPECIALS + self.words + ["<sot>", "<eot>"]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        """Words of a prompt (punctuation dropped)."""
        return re.findall(r"[a-z]+", text.lower())

    def __call__(self, texts: Sequence[str] | str) -> Tensor:
        """Token ids [B, context_length]: <sot> words <eot>, zero padded, truncated to fit."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, 1) for w in self.split(text)][: self.context_length - 2]
            ids = [self.index["<sot>"], *ids, self.index["<eot>"]]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
