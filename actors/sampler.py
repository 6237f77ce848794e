"""Rollout (sampler) actors for inference-time alignment, and the driver plumbing the DPS / FKS recipes share.

A SamplerActor holds the frozen backbone, codec and clean reward; it runs DPS or FK steering on a chunk of
prompts with values from the value actor pool (a ValueClient), decodes the final samples and scores them with
the clean reward. The driver spreads prompt chunks over the rollout actors and gathers results with a progress bar.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rlstitch.config import ConfigError
from rlstitch.data.prompts import load_prompts
from rlstitch.placement import Placement

REQUIRED = "REQUIRED"  # placeholder of a value the user must give


@dataclass
class ValueChoice:
    """The value model the recipe steers with (served by the value actor pool)."""

    kind: str = "stitchvm"  # stitchvm | tweedie | monte_carlo
    stitch: str | None = None  # artifact registry name or folder (default "<backbone>_<reward>")
    policy: str = "least_loaded"  # load balancing over the value actors: least_loaded | round_robin


@dataclass
class InferenceConfig:
    """Knobs the DPS and FKS recipes share."""

    backbone: str = "tiny-sd3"
    backbone_path: str | None = None
    reward: str = "tiny-clip"  # the reward V estimates, and the clean reward of the final images
    reward_path: str | None = None
    value: ValueChoice = field(default_factory=ValueChoice)
    prompts: str = ""  # a text file with one prompt per line; empty: the tiny world's held-out captions
    num_prompts: int = 8  # first n prompts of the file / captions
    latent_hw: list[int] = field(default_factory=lambda: [8, 8])
    steps: int = 20
    schedule: str = "auto"  # auto: the backbone's pipeline schedule if it has a scheduler config, else static
    shift: float = 1.0  # schedule=static only: t' = s t / (1 + (s-1) t) on linspace(1, 0, steps+1)
    noise_level: float = 2.0  # SDE noise nu (SPEC: nu^2 = 4t/(1-t))
    cfg_scale: float = 4.0
    chunk: int = 2  # prompts per rollout call (the unit the progress bar counts)
    seed: int = 0  # prompt k uses seed + k
    out: str = "outputs/inference"
    tiny_dir: str | None = None  # a rebuilt tiny world (forwarded to every actor)
    ray_num_cpus: int = 0  # local Ray CPUs (0: max(cores, what the actors ask)); ignored on a cluster
    run_name: str = ""  # the metrics' run tag (default: the name of out)
    placement: Placement = field(default_factory=Placement)

    def validate(self) -> None:
        """Start-up checks naming the knob to change."""
        unset = [k for k in ("backbone_path", "reward_path", "prompts", "out") if getattr(self, k) == REQUIRED]
        if self.value.stitch == REQUIRED:
            unset.append("value.stitch")
        if unset:
            raise ConfigError(f"set {', '.join(f'{k}=...' for k in unset)} (the config leaves them {REQUIRED})")
        for k in ("num_prompts", "steps", "chunk"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if len(self.latent_hw) != 2 or min(self.latent_hw) < 1:
            raise ConfigError(f"latent_hw must be two positive sizes, got {self.latent_hw}")
        if self.value.policy not in ("least_loaded", "round_robin"):
            raise ConfigError(f"value.policy={self.value.policy!r} must be least_loaded or round_robin")
        self.placement.validate()
        self.value_spec().validate()
        try:
            self.grid()
        except (KeyError, ValueError) as e:
            raise ConfigError(str(e).strip("\"'")) from e

    def grid(self) -> list[float] | None:
        """The sampling times (the backbone pipeline's at latent_hw), or None for the static shift(linspace)."""
        from rlstitch.sampling.schedule import sampling_grid

        g = sampling_grid(self.schedule, self.backbone, self.backbone_path, self.steps, self.shift, self.latent_hw,
                          knob="")
        return None if g is None else list(g)

    def value_spec(self):
        """The ValueSpec the value actors load (same backbone and reward as the sampler)."""
        from actors.value import ValueSpec

        return ValueSpec(kind=self.value.kind, backbone=self.backbone, backbone_path=self.backbone_path,
                         reward=self.reward, reward_path=self.reward_path, stitch=self.value.stitch,
                         tiny_dir=self.tiny_dir)

    def models(self) -> dict:
        """What a rollout actor loads."""
        return {"backbone": self.backbone, "backbone_path": self.backbone_path, "reward": self.reward,
                "reward_path": self.reward_path, "tiny_dir": self.tiny_dir}


def begin(cfg: InferenceConfig, recipe: str) -> tuple[dict, list[str], list[int]]:
    """Ray (a local instance sized for the rollout and value actors), the run's metric tags, its prompts and
    their noise seeds."""
    from actors.runtime import init_ray

    init_ray(cfg.ray_num_cpus or None, need=cfg.placement.rollout.cpus + cfg.placement.value.cpus)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cycle=True)
    tags = {"recipe": recipe, "run": cfg.run_name or Path(cfg.out).name}
    return tags, prompts, [cfg.seed + k for k in range(len(prompts))]


class SamplerActor:
    """Frozen backbone + codec + clean reward; DPS and FK steering over chunks of prompts."""

    def __init__(self, models: Mapping, client=None, rank: int = 0, world_size: int = 1, tags: Mapping | None = None):
        from rlstitch.models.registry import BACKBONES, load_backbone, load_codec, load_reward

        if models.get("tiny_dir"):
            os.environ["RLSTITCH_TINY_DIR"] = models["tiny_dir"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(models["backbone"], models.get("backbone_path"), device=self.device)
        self.codec = load_codec(BACKBONES[models["backbone"]].vae, device=self.device)
        self.reward = load_reward(models["reward"], models.get("reward_path"), device=self.device)
        self.client, self.rank, self.tags = client, rank, {"role": "rollout", **dict(tags or {})}

    def _sampler(self, o: Mapping, sde: bool = True):
        from rlstitch.sampling.flow import FlowSampler

        grid = tuple(o["grid"]) if o.get("grid") is not None else None
        return FlowSampler(steps=o["steps"], shift=o["shift"], sde=sde, noise_level=o["noise_level"], grid=grid)

    def dps(self, prompts: Sequence[str], seeds: Sequence[int], o: Mapping) -> dict:
        """Guided samples (values and gradients from the pool), and the unguided ones with o["baseline"]."""
        from rlstitch.sampling.guidance import dps_sample

        start = time.perf_counter()
        kw = dict(sampler=self._sampler(o), cfg_scale=o["cfg_scale"], seeds=seeds, latent_hw=tuple(o["latent_hw"]),
                  max_coeff=o["max_coeff"])
        out = dps_sample(self.backbone, self.codec, self.client.grad_fn(), prompts, scale=o["scale"], **kw)
        res = {"images": _uint8(out.images), "reward": self._score(out.images, prompts)}
        if o.get("baseline"):
            base = dps_sample(self.backbone, self.codec, None, prompts, scale=0.0, **kw)
            res["baseline_reward"] = self._score(base.images, prompts)
        res["seconds"] = time.perf_counter() - start
        self._record(len(prompts), o["steps"])
        return res

    def fks(self, prompts: Sequence[str], seeds: Sequence[int], o: Mapping) -> dict:
        """FK steering with values from the pool; one selected sample per prompt."""
        from rlstitch.sampling.fk import FKConfig, fk_steer, value_cost

        start = time.perf_counter()
        fk_cfg = FKConfig(**o["fk"])
        value_fn = self.client.value_fn() if fk_cfg.uses_value else None
        out = fk_steer(self.backbone, self.codec, self.reward, prompts, fk_cfg, value_fn=value_fn,
                       cost=value_cost(o["value_kind"]), sampler=self._sampler(o), cfg_scale=o["cfg_scale"],
                       seeds=seeds, latent_hw=tuple(o["latent_hw"]))
        self._record(len(prompts) * fk_cfg.particles, o["steps"])
        return {"images": _uint8(out.images), "reward": out.rewards.tolist(), "evals": out.counter.counts,
                "resampled": out.resampled, "seconds": time.perf_counter() - start}

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        """Clean reward of decoded images."""
        with torch.no_grad():
            return self.reward.score(images, list(prompts)).float().cpu().tolist()

    def _record(self, samples: int, steps: int) -> None:
        """Rollout metrics."""
        from actors.metrics import record

        if ray.is_initialized():
            record("rlstitch_rollouts_total", samples, self.tags)
            record("rlstitch_denoise_steps_total", samples * steps, self.tags)


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as uint8 (a quarter of the bytes back to the driver)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def run_chunks(workers: Sequence, method: str, prompts: Sequence[str], seeds: Sequence[int], chunk: int,
               opts: Mapping, desc: str, timeout_s: float = 3600.0) -> list[dict]:
    """Spread prompt chunks round-robin over the rollout actors; results in prompt order, with a progress bar.

    A TimeoutError names the chunks left when none finishes within timeout_s seconds."""
    refs, order = [], {}
    for k, a in enumerate(range(0, len(prompts), chunk)):
        ref = getattr(workers[k % len(workers)], method).remote(prompts[a : a + chunk], seeds[a : a + chunk], opts)
        order[ref] = k
        refs.append(ref)
    results: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not done:
                raise TimeoutError(f"no prompt chunk finished within {timeout_s:g} s (chunks left: "
                                   f"{sorted(order[r] for r in pending)}); see `ray status` and the rollout actors' logs")
            res = ray.get(done[0])
            results[order[done[0]]] = res
            bar.update(len(res["reward"]))
    return results


def write_outputs(out: Path, prompts: Sequence[str], seeds: Sequence[int], results: Sequence[dict], extra: dict) -> dict:
    """images.png (one tile per prompt, in order) and rewards.json (clean reward per prompt and the mean)."""
    from torchvision.utils import save_image

    from rlstitch.io import atomic_write, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    images = torch.cat([r["images"] for r in results]).float() / 255
    if images.shape[-1] < 128:  # tiny-world samples are 32 px: enlarge the tiles (nearest) so they can be seen
        images = torch.nn.functional.interpolate(images, scale_factor=-(-128 // images.shape[-1]), mode="nearest")
    atomic_write(out / "images.png", lambda tmp: save_image(images, tmp, nrow=min(8, len(images)), padding=1),
                 suffix=".png")
    reward = [x for r in results for x in r["reward"]]
    summary = {"prompts": list(prompts), "seeds": list(seeds), "reward": reward,
               "reward_mean": sum(reward) / len(reward), **extra}
    atomic_write_text(out / "rewards.json", json.dumps(summary, indent=2))
    return summary
