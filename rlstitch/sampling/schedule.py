"""The sampling time grid a backbone's own diffusers pipeline uses (StableDiffusion3Pipeline, FluxPipeline).

A real backbone's grid comes from its scheduler config (the `scheduler/scheduler_config.json` of its diffusers
folder, or the published copy embedded below) exactly as the pipeline builds it from
FlowMatchEulerDiscreteScheduler (diffusers 0.42):
  SD3:  s_k = linspace(1, sigma_min, n)_k, sigma_min = shift(1/N) with N = num_train_timesteps (the scheduler
        shifts its training sigmas at init and set_timesteps shifts the linspace again: at 28 steps and shift 3
        the last non-zero time is 0.0089, not 1/28 shifted = 0.1).
  FLUX: s_k = linspace(1, 1/n, n)_k (the sigmas FluxPipeline passes), shifted with mu = calculate_shift(image
        tokens): exp(mu) t / (exp(mu) t + 1 - t), i.e. a static shift of exp(mu) (1.88 at 512 px, 3.16 at 1024 px).
then the optional shift_terminal stretch and a final 0. The tiny world has no scheduler config and keeps the
static grid shift(linspace(1, 0, n+1)) of FlowSampler (sampler.schedule=auto resolves to static for it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

SCHEDULES = ("auto", "pipeline", "static")
PATCH = 2  # SD3.5 patch_size and FLUX's 2x2 packing: image tokens = (h // 2) * (w // 2) of the latent


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers FlowMatchEulerDiscreteScheduler config that set the sampling grid (its defaults)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str = "scheduler config") -> SchedulerConfig:
        """From a scheduler_config.json's dict (diffusers' private "_..." keys ignored); unsupported settings raise."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        bad = [k for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                           "stochastic_sampling") if getattr(cfg, k)]
        if bad:  # none of the presets sets them; rlstitch's sampler has its own SDE and no re-spaced grids
            raise ValueError(f"{source}: {bad} not supported by rlstitch's flow sampler (set them false)")
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"{source}: time_shift_type={cfg.time_shift_type!r} must be exponential or linear")
        if not cfg.shift > 0 or cfg.num_train_timesteps < 1:
            raise ValueError(f"{source}: need shift > 0 and num_train_timesteps >= 1, got {cfg.shift}, "
                             f"{cfg.num_train_timesteps}")
        return cfg

    def mu(self, image_seq_len: int) -> float:
        """diffusers' calculate_shift: mu linear in the image token count through (base, base_shift), (max, max_shift)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + self.base_shift - m * self.base_image_seq_len


# The published scheduler/scheduler_config.json of each real preset (diffusers' private "_class_name" /
# "_diffusers_version" keys left out). Sources: SD3.5-medium / -large ship SD3-medium's scheduler
# (FlowMatchEulerDiscreteScheduler, num_train_timesteps 1000, shift 3.0; huggingface.co/blog/sd3-5 "text encoders,
# VAE, and noise scheduler stay exactly the same as in SD3 Medium"; the 28-step last sigma 0.009 of
# apple/coreai-models#190's diffusers parity check). FLUX.1-dev: huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/
# scheduler/scheduler_config.json (quoted in huggingface/diffusers#10675: max_shift 1.15; BFL's sampling.py uses
# 256 -> 0.5, 4096 -> 1.15), shift 3.0 unused under use_dynamic_shifting. A model folder's own file wins.
PUBLISHED = {
    "sd35-medium": {"num_train_timesteps": 1000, "shift": 3.0},
    "sd35-large": {"num_train_timesteps": 1000, "shift": 3.0},
    "flux-dev": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
}


def _local_file(source: str) -> Path | None:
    """scheduler/scheduler_config.json of a diffusers folder, or of a hub id in the local hub cache."""
    if Path(source).is_dir():
        f = Path(source) / "scheduler" / "scheduler_config.json"
        return f if f.is_file() else None
    if "/" not in source or source.startswith(("/", ".")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
    except ValueError:  # not a valid hub id either (a missing relative folder): nothing local to read
        return None
    return Path(hit) if isinstance(hit, str) else None


def scheduler_config(backbone: str, path: str | None = None) -> SchedulerConfig | None:
    """A backbone's scheduler config: the model folder's (path, else the registry's hub id in the local cache)
    file wins over the published copy; None for a backbone without one (the tiny world)."""
    from rlstitch.models.registry import BACKBONES

    if backbone not in BACKBONES:
        raise KeyError(f"unknown backbone {backbone!r}; known: {sorted(BACKBONES)}")
    if backbone.startswith("tiny-"):
        return None
    file = _local_file(path or BACKBONES[backbone].hub)
    if file is not None:
        try:
            return SchedulerConfig.from_dict(json.loads(file.read_text()), str(file))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{file} is not a readable scheduler config: {e}") from e
    return SchedulerConfig.from_dict(PUBLISHED[backbone], f"the published {backbone} scheduler config") \
        if backbone in PUBLISHED else None


def image_seq_len(latent_hw: tuple[int, int] | list[int]) -> int:
    """The image token count the pipelines feed calculate_shift for a latent of size h x w."""
    h, w = latent_hw
    return (h // PATCH) * (w // PATCH)


def pipeline_grid(cfg: SchedulerConfig, family: str, steps: int, latent_hw) -> Tensor:
    """The steps+1 times (float64, 1 -> 0) the family's diffusers pipeline samples at for this latent size."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = cfg.num_train_timesteps
    if family == "flux":
        s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    elif family == "sd3":
        # __init__'s sigma_min (its training sigmas shifted, unless dynamic); set_timesteps' linspace ends there
        lo = 1.0 / n if cfg.use_dynamic_shifting else cfg.shift / n / (1 + (cfg.shift - 1) / n)
        s = torch.linspace(1.0, lo, steps, dtype=torch.float64)
    else:
        raise ValueError(f"no pipeline schedule for backbone family {family!r} (sd3 | flux)")
    if cfg.use_dynamic_shifting:
        mu = cfg.mu(image_seq_len(latent_hw))
        e = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
        s = e / (e + (1 / s - 1))
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    if cfg.shift_terminal:  # stretch so that the last non-zero time is shift_terminal
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - cfg.shift_terminal))
    return torch.cat([s, s.new_zeros(1)])


def resolve(schedule: str, backbone: str, path: str | None, shift: float, knob: str = "sampler.") -> SchedulerConfig | None:
    """The scheduler config a run samples with (None: the static grid), checked; `knob` prefixes the settings' names."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{knob}schedule={schedule!r} must be one of {SCHEDULES}")
    if schedule == "static":
        return None
    cfg = scheduler_config(backbone, path)
    if cfg is None and schedule == "pipeline":
        raise ValueError(f"{knob}schedule=pipeline but backbone {backbone!r} has no scheduler config "
                         f"(use {knob}schedule=static with {knob}shift)")
    if cfg is not None and shift != 1.0:
        raise ValueError(f"{knob}shift={shift} is set but {backbone!r} samples on its pipeline's schedule "
                         f"(its scheduler config sets the shift): drop {knob}shift, or set {knob}schedule=static")
    return cfg


def sampling_grid(schedule: str, backbone: str, path: str | None, steps: int, shift: float, latent_hw,
                  knob: str = "sampler.") -> tuple[float, ...] | None:
    """The grid a FlowSampler takes (FlowSampler.grid): the pipeline's, or None for the static shift(linspace)."""
    from rlstitch.models.registry import BACKBONES

    cfg = resolve(schedule, backbone, path, shift, knob)
    if cfg is None:
        return None
    return tuple(pipeline_grid(cfg, BACKBONES[backbone].family, steps, latent_hw).tolist())
