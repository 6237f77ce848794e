"""Model adapters: diffusion backbones, pixel rewards, latent codecs, text conditioning, and their registry."""

from rlstitch.models.backbone import DiffusionBackbone, FluxBackbone, SD3Backbone
from rlstitch.models.codec import LatentCodec
from rlstitch.models.condition import Condition
from rlstitch.models.registry import WeightsNotFoundError, load_backbone, load_codec, load_reward
from rlstitch.models.reward import AestheticReward, ClipReward, PixelReward

__all__ = [
    "AestheticReward",
    "ClipReward",
    "Condition",
    "DiffusionBackbone",
    "FluxBackbone",
    "LatentCodec",
    "PixelReward",
    "SD3Backbone",
    "WeightsNotFoundError",
    "load_backbone",
    "load_codec",
    "load_reward",
]
