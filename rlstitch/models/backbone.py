"""Diffusion transformer adapters (SD3 MMDiT, FLUX) in the SPEC's time convention: t=1 noise, t=0 clean.

`velocity` is the full forward; `features(..., upto=i)` is a truncated forward that stops after block i
(1-based; the later blocks are never run), returning the image tokens on the DiT's patch grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from rlstitch.models.condition import Condition

TextEncoder = Callable[[Sequence[str]], Condition]


def _as_time(t: Tensor | float, batch: int, device, dtype) -> Tensor:
    """A scalar or per-sample time as a [B] tensor, validated to lie in [0, 1]."""
    t = torch.as_tensor(t, device=device, dtype=dtype)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or shape [{batch}], got {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"t must lie in [0, 1] (t=1 is noise), got min {float(t.min())} max {float(t.max())}")
    return t


class DiffusionBackbone(nn.Module):
    """Common interface over a diffusers transformer; subclasses adapt the forward pass."""

    family: str = ""

    def __init__(self, model: nn.Module, text_encoder: TextEncoder | None = None, name: str = ""):
        super().__init__()
        self.model = model
        self.text_encoder = text_encoder
        self.name = name or self.family
        self._null: Condition | None = None
        # rows through full forwards, and through those run with gradients (a backward follows them):
        # the compute accounting (rlstitch/train/cost.py) reads these counters
        self.work = {"denoiser_fwd": 0, "denoiser_bwd": 0}

    # -- what subclasses provide -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks that `features` can stop after."""
        raise NotImplementedError

    @property
    def hidden_dim(self) -> int:
        """Width d_u of the image tokens `features` returns."""
        return self.model.inner_dim

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side."""
        raise NotImplementedError

    def _forward(self, z: Tensor, t: Tensor, cond: Condition, upto: int | None, keep: list | None = None) -> Tensor:
        """Run up to block `upto` (tokens) or the whole model (velocity, [B, C, H, W]).

        With `keep`, the image tokens after every block run are appended to it (one pass, all depths).
        """
        raise NotImplementedError

    # -- shared API ----------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latent z."""
        return self.model.config.out_channels or self.model.config.in_channels

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h_u, w_u) for a latent of spatial size latent_hw."""
        p = self.patch_size
        return latent_hw[0] // p, latent_hw[1] // p

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the transformer."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the transformer's parameters (inputs are moved there)."""
        return next(self.model.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        """Text condition for a list of prompts (needs a text encoder)."""
        if self.text_encoder is None:
            raise RuntimeError(f"backbone {self.name!r} was loaded without a text encoder")
        return self.text_encoder(list(prompts))

    def null_condition(self) -> Condition:
        """The fixed null-text (empty prompt) condition, batch 1; zeros when there is no text encoder."""
        if self._null is None:
            if self.text_encoder is not None:
                with torch.no_grad():
                    self._null = self.text_encoder([""])
            else:
                cfg = self.model.config
                self._null = Condition(
                    torch.zeros(1, 1, cfg.joint_attention_dim), torch.zeros(1, cfg.pooled_projection_dim)
                )
        return self._null

    def _check(self, z: Tensor, t: Tensor | float, cond: Condition | None) -> tuple[Tensor, Tensor, Condition]:
        """Validate inputs, broadcast t / cond to the batch and move all three to the model's device and dtype."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name}: latent must be [B, {self.latent_channels}, H, W], got {tuple(z.shape)}")
        if z.shape[2] % self.patch_size or z.shape[3] % self.patch_size:
            raise ValueError(f"{self.name}: latent H, W must be multiples of the patch size {self.patch_size}")
        if not torch.isfinite(z).all():
            raise ValueError(f"{self.name}: latent contains NaN or Inf")
        cond = (cond if cond is not None else self.null_condition()).expand(z.shape[0])
        t = _as_time(t, z.shape[0], z.device, torch.float32)  # validated where z is, then moved
        device = self.device
        return z.to(device, self.dtype), t.to(device), cond.to(device, self.dtype)

    def velocity(self, z: Tensor, t: Tensor | float, cond: Condition | None = None) -> Tensor:
        """Predicted velocity v = eps - z0 at (z_t, t), in float32."""
        z, t, cond = self._check(z, t, cond)
        self.work["denoiser_fwd"] += z.shape[0]
        if torch.is_grad_enabled():
            self.work["denoiser_bwd"] += z.shape[0]
        return self._forward(z, t, cond, None).float()

    def features(self, z: Tensor, t: Tensor | float, cond: Condition | None = None, *, upto: int) -> Tensor:
        """Image tokens [B, h_u*w_u, d_u] after block `upto` (1..num_blocks), by a truncated forward."""
        if not 1 <= upto <= self.num_blocks:
            raise ValueError(f"{self.name}: upto must be in 1..{self.num_blocks}, got {upto}")
        z, t, cond = self._check(z, t, cond)
        return self._forward(z, t, cond, upto)

    def features_all(self, z: Tensor, t: Tensor | float, cond: Condition | None = None, *, upto: int) -> list[Tensor]:
        """Image tokens after each block 1..upto, from one truncated forward."""
        keep: list[Tensor] = []
        if not 1 <= upto <= self.num_blocks:
            raise ValueError(f"{self.name}: upto must be in 1..{self.num_blocks}, got {upto}")
        z, t, cond = self._check(z, t, cond)
        self._forward(z, t, cond, upto, keep)
        return keep


class SD3Backbone(DiffusionBackbone):
    """diffusers SD3Transformer2DModel (SD3 / SD3.5): timestep = 1000 t."""

    family = "sd3"

    @property
    def num_blocks(self) -> int:
        """Joint transformer blocks."""
        return len(self.model.transformer_blocks)

    @property
    def patch_size(self) -> int:
        """PatchEmbed patch size."""
        return self.model.config.patch_size

    def _forward(self, z: Tensor, t: Tensor, cond: Condition, upto: int | None, keep: list | None = None) -> Tensor:
        """Mirror of SD3Transformer2DModel.forward that can stop after block `upto`."""
        m = self.model
        if upto is None:
            return m(z, cond.tokens, cond.pooled, (t * 1000).to(z.dtype), return_dict=False)[0]
        h = m.pos_embed(z).contiguous()
        temb = m.time_text_embed((t * 1000).to(z.dtype), cond.pooled)
        ctx = m.context_embedder(cond.tokens)
        for block in m.transformer_blocks[:upto]:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
            if keep is not None:
                keep.append(h)
        return h


class FluxBackbone(DiffusionBackbone):
    """diffusers FluxTransformer2DModel: packs p x p latent patches into tokens, timestep = t (x1000 inside).

    Blocks are numbered double-stream first, then single-stream. Guidance-distilled models (FLUX.1-dev)
    get the guidance scale as an embedding instead of classifier-free guidance.
    """

    family = "flux"

    def __init__(self, model, text_encoder=None, name="", pack: int = 2, guidance: float = 3.5):
        super().__init__(model, text_encoder, name)
        self.pack = pack
        self.guidance = guidance
        if model.config.in_channels % (pack * pack):
            raise ValueError(f"FLUX in_channels {model.config.in_channels} not divisible by pack^2={pack * pack}")

    @property
    def num_blocks(self) -> int:
        """Double-stream plus single-stream blocks."""
        return len(self.model.transformer_blocks) + len(self.model.single_transformer_blocks)

    @property
    def patch_size(self) -> int:
        """Packing factor (2 for FLUX.1)."""
        return self.pack

    @property
    def latent_channels(self) -> int:
        """Unpacked latent channels."""
        return self.model.config.in_channels // (self.pack * self.pack)

    def _pack(self, z: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), C p p] (the FLUX pipeline's layout)."""
        b, c, h, w = z.shape
        p = self.pack
        z = z.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpack(self, x: Tensor, h: int, w: int) -> Tensor:
        """Inverse of `_pack`."""
        b, _, cpp = x.shape
        p = self.pack
        x = x.view(b, h // p, w // p, cpp // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, cpp // (p * p), h, w)

    def _ids(self, h: int, w: int, n_txt: int, device, dtype) -> tuple[Tensor, Tensor]:
        """Rotary position ids for image tokens (row, col) and text tokens (zeros)."""
        gh, gw = h // self.pack, w // self.pack
        img = torch.zeros(gh, gw, 3)
        img[..., 1] = torch.arange(gh)[:, None]
        img[..., 2] = torch.arange(gw)[None, :]
        return img.reshape(gh * gw, 3).to(device, dtype), torch.zeros(n_txt, 3, device=device, dtype=dtype)

    def _forward(self, z: Tensor, t: Tensor, cond: Condition, upto: int | None, keep: list | None = None) -> Tensor:
        """Mirror of FluxTransformer2DModel.forward that can stop after block `upto`."""
        m = self.model
        h, w = z.shape[-2:]
        x = self._pack(z)
        img_ids, txt_ids = self._ids(h, w, cond.tokens.shape[1], z.device, z.dtype)
        guidance = torch.full_like(t, self.guidance).to(z.dtype) if m.config.guidance_embeds else None
        if upto is None:
            out = m(x, cond.tokens, cond.pooled, t.to(z.dtype), img_ids, txt_ids, guidance, return_dict=False)[0]
            return self._unpack(out, h, w)
        x = m.x_embedder(x)
        ts = t.to(z.dtype) * 1000
        temb = m.time_text_embed(ts, cond.pooled) if guidance is None else m.time_text_embed(ts, guidance * 1000, cond.pooled)
        ctx = m.context_embedder(cond.tokens)
        rope = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
        for block in blocks[:upto]:
            ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb, image_rotary_emb=rope)
            if keep is not None:
                keep.append(x)
        return x
