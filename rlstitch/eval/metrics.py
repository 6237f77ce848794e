"""Retrieval Recall@1 with repeated captions, and Spearman rank correlation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def unique_captions(captions: Sequence[str]) -> list[str]:
    """Distinct captions in first-seen order (the text gallery)."""
    return list(dict.fromkeys(captions))


def recall_at_1(img_emb: Tensor, captions: Sequence[str], txt_emb: Tensor, gallery: Sequence[str]) -> dict:
    """I->T and T->I Recall@1 over image/caption pairs.

    I->T: an image's top caption in the (distinct) caption gallery must be its own caption.
    T->I: each pair's caption retrieves among all images; correct if the top image carries that caption
    (a repeated caption has several right answers).
    """
    if len(img_emb) != len(captions) or len(txt_emb) != len(gallery):
        raise ValueError("embeddings and captions must align")
    sim = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T  # [N, G]
    index = {c: k for k, c in enumerate(gallery)}
    own = torch.tensor([index[c] for c in captions], device=sim.device)
    i2t = (sim.argmax(1) == own).float().mean().item()
    top_img = sim[:, own].argmax(0)  # for each pair's caption, the best image
    t2i = float(np.mean([captions[int(k)] == captions[q] for q, k in enumerate(top_img)]))
    return {"i2t": i2t, "t2i": t2i}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (SRCC)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)
