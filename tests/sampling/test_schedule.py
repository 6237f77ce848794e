"""Pipeline schedules: the real presets' grids and Euler trajectories equal diffusers' FlowMatchEulerDiscreteScheduler
driven the way StableDiffusion3Pipeline / FluxPipeline drive it; the tiny world keeps its static grid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rlstitch.config import ConfigError
from rlstitch.models.registry import BACKBONES
from rlstitch.sampling.flow import FlowSampler, time_grid
from rlstitch.sampling.schedule import (
    PUBLISHED,
    SchedulerConfig,
    image_seq_len,
    sampling_grid,
    scheduler_config,
)

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(64, 64), (128, 128), (96, 64), (32, 32)]  # 512 px, 1024 px, 768x512, 256 px latents
STEPS = [1, 4, 10, 25, 28, 40]


def diffusers_scheduler(config: dict, family: str, steps: int, latent_hw):
    """The scheduler after set_timesteps exactly as the family's diffusers pipeline calls it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = sch.config
    mu = calculate_shift(image_seq_len(latent_hw), c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    if family == "flux":  # FluxPipeline: its own sigmas, and mu always
        sch.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:  # StableDiffusion3Pipeline: set_timesteps(n), mu only under dynamic shifting
        sch.set_timesteps(steps, **({"mu": mu} if c.use_dynamic_shifting else {}))
    return sch


def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
    """An analytic, nonlinear velocity field (so a wrong time or step size shows in the trajectory)."""
    return torch.sin(3 * z) * (1 + t) - z * t**2 + 0.5 * t


def euler_max_diff(grid, sch) -> float:
    """Max |z| difference over the trajectory: FlowSampler on `grid` vs diffusers' step() loop."""
    z1 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = FlowSampler(steps=len(grid) - 1, grid=grid).sample(velocity, z1.clone(), keep_trajectory=True).trajectory
    z, theirs = z1.clone(), [z1]
    for i, t in enumerate(sch.timesteps):
        z = sch.step(velocity(z, float(sch.sigmas[i])), t, z).prev_sample
        theirs.append(z)
    assert len(ours) == len(theirs)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_grids_and_euler_trajectories_equal_the_diffusers_pipeline(preset):
    family, worst = BACKBONES[preset].family, {}
    for hw in SIZES:
        for steps in STEPS:
            sch = diffusers_scheduler(PUBLISHED[preset], family, steps, hw)
            grid = sampling_grid("auto", preset, None, steps, 1.0, hw)
            sigma = float((torch.tensor(grid, dtype=torch.float64) - sch.sigmas.double()).abs().max())
            assert sigma < 1e-6, (preset, hw, steps, sigma)
            traj = euler_max_diff(grid, sch)  # float32 states: a few ulps (2.4e-7 at |z| ~ 2) per step at most
            assert traj < 3e-5, (preset, hw, steps, traj)
            worst[hw, steps] = (sigma, traj)
    print(preset, {f"{h}x{w}/{n}": f"{s:.1e}/{t:.1e}" for (((h, w), n), (s, t)) in worst.items()})


def test_the_issues_numbers():
    """FLUX's shift is exp(mu) = 1.88 at 512 px and 3.16 at 1024 px; SD3.5 ends at t 0.0089 (28 steps)."""
    flux = scheduler_config("flux-dev")
    assert np.exp(flux.mu(image_seq_len((64, 64)))) == pytest.approx(1.878, abs=1e-3)
    assert np.exp(flux.mu(image_seq_len((128, 128)))) == pytest.approx(3.158, abs=1e-3)
    assert sampling_grid("auto", "sd35-medium", None, 28, 1.0, (64, 64))[-2] == pytest.approx(0.00893, abs=1e-5)
    old = time_grid(25, 3.0)
    new = torch.tensor(sampling_grid("auto", "flux-dev", None, 25, 1.0, (64, 64)), dtype=torch.float64)
    assert float((old - new).abs().max()) == pytest.approx(0.116, abs=1e-3)


@pytest.mark.parametrize("local", [
    {"shift": 5.0},  # a re-trained SD3 with another static shift
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},  # SD3 under dynamic shifting
    {"use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 1.5, "max_shift": 3.0},
    {"shift": 3.0, "shift_terminal": 0.05},
])
@pytest.mark.parametrize("preset", ["sd35-medium", "flux-dev"])
def test_a_model_folders_scheduler_config_wins(tmp_path, preset, local):
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, **local}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    if preset == "flux-dev" and not local.get("use_dynamic_shifting"):
        cfg["use_dynamic_shifting"] = False
    for steps, hw in [(10, (64, 64)), (28, (128, 128))]:
        sch = diffusers_scheduler(cfg, BACKBONES[preset].family, steps, hw)
        grid = torch.tensor(sampling_grid("pipeline", preset, str(tmp_path), steps, 1.0, hw), dtype=torch.float64)
        assert float((grid - sch.sigmas.double()).abs().max()) < 1e-6, (local, steps, hw)


def test_the_tiny_world_keeps_its_static_grid_bit_for_bit():
    from rlstitch.train.config import RecipeConfig, flow_sampler

    for backbone in ("tiny-flux", "tiny-sd3"):
        assert scheduler_config(backbone) is None
        cfg = RecipeConfig()
        cfg.model.backbone, cfg.sampler.steps, cfg.sampler.shift = backbone, 10, 3.0
        sampler = flow_sampler(cfg)
        assert sampler.grid is None and torch.equal(sampler.timesteps(), time_grid(10, 3.0))


def test_training_and_inference_configs_build_the_same_pipeline_grid():
    from actors.sampler import InferenceConfig
    from rlstitch.train.config import RecipeConfig, flow_sampler

    cfg = RecipeConfig()
    cfg.model.backbone, cfg.model.latent_size, cfg.sampler.steps = "flux-dev", 64, 25
    inf = InferenceConfig(backbone="flux-dev", latent_hw=[64, 64], steps=25)
    with pytest.raises(ValueError, match=r"^schedule=pipeline but backbone 'tiny-sd3'"):  # its knobs are top-level
        InferenceConfig(backbone="tiny-sd3", schedule="pipeline").grid()
    assert list(flow_sampler(cfg).grid) == inf.grid() == list(sampling_grid("pipeline", "flux-dev", None, 25, 1.0,
                                                                             (64, 64)))


@pytest.mark.parametrize(("overrides", "knob"), [
    (["sampler.schedule=pipeline"], "sampler.schedule=pipeline but backbone 'tiny-flux' has no scheduler config"),
    (["sampler.schedule=dynamic"], "sampler.schedule='dynamic' must be one of"),
    (["model.backbone=flux-dev", "sampler.shift=3.0"], r"sampler.shift=3.0 is set but 'flux-dev'"),
])
def test_bad_schedule_settings_are_named_at_start_up(overrides, knob):
    from rlstitch.config import load_config
    from rlstitch.train.config import RecipeConfig

    with pytest.raises(ConfigError, match=knob):
        load_config(RecipeConfig, overrides)


def test_unsupported_scheduler_settings_name_the_file(tmp_path):
    (tmp_path / "scheduler").mkdir()
    f = tmp_path / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({"shift": 3.0, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: \['use_karras_sigmas'\] not supported"):
        scheduler_config("sd35-large", str(tmp_path))
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable scheduler config"):
        scheduler_config("sd35-large", str(tmp_path))
    with pytest.raises(ValueError, match="time_shift_type='cosine'"):
        SchedulerConfig.from_dict({"time_shift_type": "cosine"})


def test_an_explicit_grid_is_checked():
    FlowSampler(steps=2, grid=(1.0, 0.4, 0.0))
    for bad in [(1.0, 0.0), (1.0, 0.5, 0.1), (1.0, 1.0, 0.0), (1.5, 0.5, 0.0)]:
        with pytest.raises(ValueError, match="strictly falling times"):
            FlowSampler(steps=2, grid=bad)


@pytest.mark.parametrize("path", sorted(p for r in ("nft_flux", "nft_sd35", "draft_sd35")
                                        for p in (ROOT / "recipes" / "configs" / r).glob("*.yaml")
                                        if not p.stem.startswith("tiny")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_real_stop_windows_document_their_times(path):
    """The stop_window comment's 't A .. B' are the grid times at the window's ends on the config's own schedule."""
    from rlstitch.config import load_config
    from rlstitch.train.config import RecipeConfig, flow_sampler

    cfg = load_config(RecipeConfig, [], path)
    line = next(s for s in path.read_text().splitlines() if s.strip().startswith("stop_window:"))
    a, b = map(float, re.search(r"= t ([0-9.]+) \.\. ([0-9.]+)", line).groups())
    grid = flow_sampler(cfg).timesteps()
    lo, hi = cfg.rollout.stop_window
    assert (round(float(grid[lo]), 3), round(float(grid[hi]), 3)) == (a, b)


@pytest.mark.parametrize("path", sorted(p for r in ("dps", "fks") for p in (ROOT / "recipes" / "configs" / r).glob("*.yaml")
                                        if not p.stem.startswith("tiny")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inference_configs_sample_on_the_pipeline_grid_and_document_fk_times(path, monkeypatch):
    """DPS / FKS presets take the pipeline's grid; an FK window comment's 't A .. B' are its resampling times."""
    import importlib

    from omegaconf import OmegaConf

    from rlstitch.sampling.fk import resample_steps

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    schema = {"dps": "DPSConfig", "fks": "FKSConfig"}[path.parent.name]
    schema = getattr(importlib.import_module(path.parent.name), schema)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))
    grid = cfg.grid()
    assert grid == list(sampling_grid("pipeline", cfg.backbone, None, cfg.steps, 1.0, cfg.latent_hw))
    if path.parent.name == "fks":
        line = next(s for s in path.read_text().splitlines() if s.strip().startswith("window_end:"))
        a, b = map(float, re.search(r"= t ([0-9.]+) \.\. ([0-9.]+)", line).groups())
        at = resample_steps(cfg.steps, cfg.fk.resample_every, cfg.fk.window_start, cfg.fk.window_end)
        assert (round(grid[at[0]], 3), round(grid[at[-1]], 3)) == (a, b)
