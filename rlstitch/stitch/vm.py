"""StitchVM: V(z_t) = r_{>=j}( s_psi( u_{<=i}(z_t, t, c_null) ) ) — one forward pass, no decoder, no rollout."""

from __future__ import annotations

from torch import Tensor, nn

from rlstitch.models.device import model_device
from rlstitch.stitch.layer import StitchLayer
from rlstitch.value.base import ValueEstimator


class LatentTokens(nn.Module):
    """The VAE-stitch baseline's "backbone": u_{<=i} = identity, the noisy latent's pixels as tokens."""

    family = "identity"
    num_blocks = 1

    def __init__(self, latent_channels: int, name: str = "latent"):
        super().__init__()
        self.latent_channels = self.hidden_dim = latent_channels
        self.name = name

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """One token per latent pixel."""
        return tuple(latent_hw)

    def features(self, z: Tensor, t, cond=None, *, upto: int = 1) -> Tensor:
        """[B, C, H, W] -> [B, H*W, C] (t is not seen: the baseline only gets the noisy latent)."""
        return z.flatten(2).transpose(1, 2)

    def features_all(self, z: Tensor, t, cond=None, *, upto: int = 1) -> list[Tensor]:
        """The single depth."""
        return [self.features(z, t)]


class StitchVM(ValueEstimator):
    """Frozen DiT prefix (null text) -> stitching layer -> trainable reward tail -> reward score."""

    name = "stitchvm"

    def __init__(self, backbone: nn.Module, reward: nn.Module, layer: StitchLayer, i: int, j: int):
        super().__init__(reward)
        if layer.d_u != backbone.hidden_dim or layer.d_r != reward.width:
            raise ValueError(
                f"stitch layer {layer.d_u}->{layer.d_r} does not match backbone width {backbone.hidden_dim} "
                f"and reward width {reward.width}"
            )
        if tuple(layer.grid_r) != tuple(reward.grid):  # the tail would take the wrong token count without a word
            raise ValueError(f"stitch layer grid_r {tuple(layer.grid_r)} does not match the reward's patch grid "
                             f"{tuple(reward.grid)}")
        # The stitch joins the tail, a copy of the reward's blocks: both live on the reward's device.
        self.backbone, self.layer, self.i, self.j = backbone, layer.to(model_device(reward)), i, j
        self.tail = reward.tail_module(j)
        self.latent_channels = backbone.latent_channels
        # Built frozen (backbone, reward, stitch and tail): a served V gets no weight gradients from a backward
        # through it (DPS, DRaFT); the finetune's make_optimizer is the one place that unfreezes what it trains.
        self.requires_grad_(False)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What the finetune trains and checkpoints: the stitch (lr x5) and the reward tail."""
        return {"stitch": self.layer, "tail": self.tail}

    def train(self, mode: bool = True):
        """Only the stitch and tail change mode; the frozen backbone and reward stay in eval."""
        super().train(mode)
        self.backbone.eval()
        self.reward.eval()
        return self

    def tokens(self, z: Tensor, t: Tensor) -> Tensor:
        """The stitched token sequence entering reward block j."""
        return self.layer(self.backbone.features(z, t, None, upto=self.i))

    def embed(self, z: Tensor, t: Tensor, return_tokens: bool = False):
        """Reward-space image embedding (and optionally the tail's output tokens)."""
        emb, toks = self.tail(self.tokens(z, t))
        return (emb, toks) if return_tokens else emb
