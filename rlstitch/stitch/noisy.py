"""The NoisyReward baseline: a reward image tower of the same size, trained from scratch on noisy latents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from rlstitch.io import atomic_save, atomic_write_text, sha256
from rlstitch.models.device import model_device
from rlstitch.models.fingerprint import fingerprint
from rlstitch.stitch.artifact import check_weights
from rlstitch.stitch.layer import resample_tokens
from rlstitch.value.base import ValueEstimator


def _reinit(module: nn.Module) -> None:
    """Reset every sub-module's parameters to a fresh random init."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif hasattr(m, "_reset_parameters"):
            m._reset_parameters()


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class NoisyReward(ValueEstimator):
    """Latent pixels -> tokens (+pos, +time) -> the reward tower's architecture, randomly initialised."""

    name = "noisy_reward"

    def __init__(self, reward: nn.Module, latent_channels: int, latent_hw: tuple[int, int], seed: int = 0):
        super().__init__(reward)
        d, device = reward.width, model_device(reward)
        self.latent_channels, self.latent_hw, self.grid_r = latent_channels, tuple(latent_hw), reward.grid
        # Seeded init without reseeding the caller's global RNG (every load builds one too).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.patch = nn.Linear(latent_channels, d)
            self.cls = nn.Parameter(torch.zeros(d))
            self.pos = nn.Parameter(torch.randn(reward.grid[0] * reward.grid[1], d) * 0.02)
            self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            self.tower = reward.tail_module(0)
            _reinit(self.tower)
        self.to(device)  # the new layers join the tower copy on the teacher's device
        self.requires_grad_(False)  # frozen like StitchVM until make_optimizer unfreezes what it trains

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Everything but the frozen teacher reward."""
        return {"net": nn.ModuleList([self.patch, self.time, self.tower]), "emb": _Params(self.cls, self.pos)}

    def embed(self, z: Tensor, t: Tensor, return_tokens: bool = False):
        """Reward-space embedding of a noisy latent."""
        if z.dim() != 4 or tuple(z.shape[1:]) != (self.latent_channels, *self.latent_hw):
            raise ValueError(f"{self.name}: latent must be [B, {self.latent_channels}, {self.latent_hw[0]}, "
                             f"{self.latent_hw[1]}], got {tuple(z.shape)}")
        x = resample_tokens(self.patch(z.flatten(2).transpose(1, 2)), self.latent_hw, self.grid_r) + self.pos
        x = x + self.time(time_embedding(t, x.shape[-1]))[:, None]
        emb, toks = self.tower(torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1))
        return (emb, toks) if return_tokens else emb

    def train(self, mode: bool = True):
        """The frozen teacher stays in eval."""
        super().train(mode)
        self.reward.eval()
        return self

    def save(self, out: str | Path, **extra) -> None:
        """Weights + manifest (with the teacher's fingerprint)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {f"{m}.{k}": v for m, mod in self.trainable_modules().items() for k, v in mod.state_dict().items()}
        atomic_save(state, out / "weights.safetensors")
        manifest = {"kind": "noisy_reward", "reward": {"name": self.reward.name, "fingerprint": fingerprint(self.reward)},
                    "latent_channels": self.latent_channels, "latent_hw": list(self.latent_hw),
                    "weights_sha256": sha256(out / "weights.safetensors"), **extra}
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, path: str | Path, reward: nn.Module) -> NoisyReward:
        """Load weights saved by `save`, checking the teacher reward and the weights' SHA-256."""
        path = Path(path)
        f, wfile = path / "manifest.json", path / "weights.safetensors"
        try:
            manifest = json.loads(f.read_text())
            want, shape = manifest["reward"], (manifest["latent_channels"], tuple(manifest["latent_hw"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a NoisyReward manifest ({type(e).__name__}: {e})") from e
        if want["fingerprint"] != fingerprint(reward):
            raise ValueError(f"{path}: trained against reward {want['name']!r} with other weights "
                             f"(given {reward.name!r})")
        # Artifacts written before the checksum was recorded have none; every newer one is verified.
        check_weights(wfile, manifest.get("weights_sha256"))
        net = cls(reward, *shape)
        state = load_file(wfile)
        for m, mod in net.trainable_modules().items():
            mod.load_state_dict({k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")})
        net.manifest = manifest
        return net.eval()


class _Params(nn.Module):
    """Holds loose parameters so they can be checkpointed as a module."""

    def __init__(self, *params: nn.Parameter):
        super().__init__()
        self.params = nn.ParameterList(params)
