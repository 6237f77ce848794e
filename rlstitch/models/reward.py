"""Pixel reward models over open_clip ViTs (CLIP, DFN-CLIP, HPSv2) and the aesthetic MLP head.

Images enter as float [B, 3, H, W] in [-1, 1] (the VAE's range); the model's own preprocessing (resize,
normalise) runs as differentiable torch ops so reward gradients reach the pixels and latents.
Blocks are 0-based: `prefix(x, upto=j)` runs blocks [0, j) and returns the tokens entering block j;
`tail(tokens, from_block=j)` runs blocks [j, M), pools and projects.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlstitch.models.condition import Condition

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
Tokenizer = Callable[[Sequence[str]], Tensor]


class PixelReward(nn.Module):
    """Interface: a reward r(x, prompt) with a split-able ViT image tower."""

    kind: str = ""

    def score(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        """Scalar reward per image [B]."""
        return self.score_embedding(self.embed_image(images), prompts)

    def score_embedding(self, emb: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """Reward from an (unnormalised) image embedding."""
        raise NotImplementedError


class ClipReward(PixelReward):
    """CLIP-type reward: cosine between the image embedding and the prompt's text embedding."""

    kind = "clip"

    def __init__(self, clip: nn.Module, tokenizer: Tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD, name: str = ""):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.name = name or "clip"
        device = next(clip.parameters()).device  # the normalisation joins the tower (a GPU in use)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, Tensor] = {}

    @property
    def visual(self) -> nn.Module:
        """The open_clip VisionTransformer."""
        return self.clip.visual

    @property
    def num_blocks(self) -> int:
        """Residual blocks of the image tower."""
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        """Token width d_r of the image tower."""
        return self.visual.class_embedding.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """Input resolution the tower expects."""
        s = self.visual.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h_r, w_r)."""
        return tuple(self.visual.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Special tokens before the patches ([CLS])."""
        return 1

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images -> the tower's resolution and normalisation (differentiable)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = (images.to(self.mean.device, torch.float32) + 1) / 2  # CPU images join the tower's device
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).to(self.visual.conv1.weight.dtype)

    def _run_blocks(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Run resblocks [start, stop) on batch-first tokens."""
        tr = self.visual.transformer
        if not tr.batch_first:
            x = x.transpose(0, 1)
        for block in tr.resblocks[start:stop]:
            x = block(x)
        return x if tr.batch_first else x.transpose(0, 1)

    def prefix(self, images: Tensor, upto: int) -> Tensor:
        """Tokens [B, 1 + h_r w_r, d_r] entering block `upto` (0..num_blocks)."""
        if not 0 <= upto <= self.num_blocks:
            raise ValueError(f"{self.name}: upto must be in 0..{self.num_blocks}, got {upto}")
        return self._run_blocks(self.visual._embeds(self.preprocess(images)), 0, upto)

    def prefix_all(self, images: Tensor, upto: int) -> list[Tensor]:
        """Tokens entering each block 0..upto, from one pass."""
        if not 0 <= upto <= self.num_blocks:
            raise ValueError(f"{self.name}: upto must be in 0..{self.num_blocks}, got {upto}")
        out = [self.visual._embeds(self.preprocess(images))]
        for j in range(upto):
            out.append(self._run_blocks(out[-1], j, j + 1))
        return out

    def tail(self, tokens: Tensor, from_block: int, return_tokens: bool = False):
        """Blocks [from_block, M), pooling, ln_post and projection: the (unnormalised) image embedding.

        With return_tokens, also the last block's output tokens (the per-token distillation target).
        """
        if not 0 <= from_block <= self.num_blocks:
            raise ValueError(f"{self.name}: from_block must be in 0..{self.num_blocks}, got {from_block}")
        x = self._run_blocks(tokens, from_block, self.num_blocks)
        emb = self.visual._pool(x)[0]
        emb = emb @ self.visual.proj if self.visual.proj is not None else emb
        return (emb, x) if return_tokens else emb

    def tail_module(self, from_block: int) -> ClipTail:
        """A trainable copy of r_{>=j}: blocks [j, M), ln_post and projection (the rest is not copied)."""
        return ClipTail(self.visual, from_block)

    def embed_image(self, images: Tensor) -> Tensor:
        """Image embedding (unnormalised), equal to open_clip's encode_image on preprocessed images."""
        return self.tail(self.prefix(images, 0), 0)

    def _text_tower(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Per-token text states after ln_final and the projected pooled embedding."""
        from open_clip.transformer import text_global_pool

        c = self.clip
        ids = self.tokenizer(list(prompts)).to(c.token_embedding.weight.device)
        x = c.token_embedding(ids) + c.positional_embedding
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))
        pooled = text_global_pool(x, ids, c.text_pool_type, eos_token_id=getattr(c, "text_eos_id", None))
        proj = c.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return x, pooled

    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """Text embedding (unnormalised) per prompt; cached when the tower is frozen."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.clip.transformer.parameters()):
            return self._text_tower(prompts)[1]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        with torch.no_grad():
            for p in missing:  # one at a time: a prompt's embedding must not depend on which others were new
                self._text_cache[p] = self._text_tower([p])[1][0]
        return torch.stack([self._text_cache[p] for p in prompts])

    def text_condition(self, prompts: Sequence[str]) -> Condition:
        """The text tower as a DiT conditioner: token states and pooled embedding (the tiny world uses it)."""
        with torch.no_grad():
            tokens, pooled = self._text_tower(prompts)
        return Condition(tokens.float(), pooled.float())

    def score_embedding(self, emb: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """Cosine similarity with each prompt's text embedding."""
        if prompts is None or len(prompts) != emb.shape[0]:
            got = None if prompts is None else len(prompts)
            raise ValueError(f"{self.name}: need one prompt per image ({emb.shape[0]}), got {got}")
        return F.cosine_similarity(emb.float(), self.embed_text(prompts).float(), dim=-1)

    def train(self, mode: bool = True):
        """Switching modes drops the text cache (the tower may change while training)."""
        self._text_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        """Moving or casting the reward (.to, .cuda, .half) drops the text cache, which holds the old device/dtype."""
        self._text_cache.clear()
        return super()._apply(fn, *args, **kwargs)


class ClipTail(nn.Module):
    """Copies of a ViT's blocks [j, M), ln_post and proj; pools like the source tower (token or mean)."""

    def __init__(self, visual: nn.Module, from_block: int):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("towers with attentional pooling are not supported by the stitch tail")
        self.from_block = from_block
        self.blocks = copy.deepcopy(visual.transformer.resblocks[from_block:])
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone()) if visual.proj is not None else None
        self.batch_first = visual.transformer.batch_first
        self.pool_type, self.final_ln_after_pool = visual.pool_type, visual.final_ln_after_pool

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens entering block j -> (image embedding, last block's tokens)."""
        x = tokens.to(self.ln_post.weight.dtype)
        x = x if self.batch_first else x.transpose(0, 1)
        for block in self.blocks:
            x = block(x)
        x = x if self.batch_first else x.transpose(0, 1)
        y = x if self.final_ln_after_pool else self.ln_post(x)
        pooled = y[:, 1:].mean(1) if self.pool_type == "avg" else y[:, 0]
        pooled = self.ln_post(pooled) if self.final_ln_after_pool else pooled
        return (pooled @ self.proj if self.proj is not None else pooled), x


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor's MLP (Linear layers with dropout) on an L2-normalised embedding."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if k < 2:
                layers.append(nn.Dropout(0.2 if k == 0 else 0.1))
        layers.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, emb: Tensor) -> Tensor:
        """Score per embedding [B], in float32 (the layers may be bf16/fp16)."""
        x = F.normalize(emb.float(), dim=-1).to(self.layers[0].weight.dtype)
        return self.layers(x).squeeze(-1).float()


class AestheticReward(ClipReward):
    """Aesthetic predictor: the MLP head on the normalised CLIP image embedding; prompts are ignored."""

    kind = "aesthetic"

    def __init__(self, clip: nn.Module, tokenizer: Tokenizer, head: AestheticMLP, **kw):
        super().__init__(clip, tokenizer, **kw)
        self.head = head

    def score_embedding(self, emb: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        """MLP score of the embedding."""
        return self.head(emb)
