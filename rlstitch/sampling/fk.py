"""Feynman-Kac (FK) steering with a value model (SPEC §2), Best-of-N, and StitchVM proposal scaling.

N particles per prompt follow the SDE sampler. At resampling steps (every k steps inside a window) each
particle is weighted by a potential of its value — diff exp(lambda (V_new - V_prev)), max exp(lambda max_s V_s)
or add exp(lambda sum_s V_s), as in the FK-steering reference code — and the particles of a prompt are
resampled multinomially (optionally only when ESS < threshold * N). At proposal steps (the first ~40% of the
grid) each particle draws M stochastic proposals for its next latent, all N*M are scored by V and each
particle keeps its argmax. The final sample of a prompt is its best particle under the clean reward (or V).

Every network evaluation is counted per latent (denoiser, stitchvm, decoder, reward), so methods can be
compared at equal compute. The weight/ESS/resampling/argmax helpers are pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlstitch.models.device import model_device
from rlstitch.sampling.flow import SDE_SEED_OFFSET, FlowSampler, generators
from rlstitch.sampling.generate import cfg_velocity, initial_noise

POTENTIALS = ("diff", "max", "add")
FINAL_SELECT = ("reward", "value", "none")
ValueFn = Callable[[Tensor, float, Sequence[str] | None], Tensor]  # (z, t, prompts) -> values [B]


# ------------------------------------------------------------------------------------------- pure helpers


def initial_state(kind: str, shape: Sequence[int]) -> Tensor:
    """The potential's state before the first resampling: 0 (diff, add) or -inf (max)."""
    if kind not in POTENTIALS:
        raise ValueError(f"unknown potential {kind!r}; known: {POTENTIALS}")
    return torch.full(tuple(shape), -math.inf if kind == "max" else 0.0)


def potential(kind: str, v_new: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """(score, new state): log G = lambda * score. diff: V_new - V_prev; max: running max; add: running sum."""
    if kind == "diff":
        return v_new - state, v_new
    if kind == "max":
        s = torch.maximum(v_new, state)
        return s, s
    if kind == "add":
        s = v_new + state
        return s, s
    raise ValueError(f"unknown potential {kind!r}; known: {POTENTIALS}")


def normalized_weights(log_w: Tensor) -> Tensor:
    """Self-normalised weights along the particle (last) dimension."""
    return torch.softmax(log_w.double(), dim=-1)


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size 1 / sum w^2 per row (N for equal weights, 1 for a single heavy particle)."""
    return 1.0 / normalized_weights(log_w).square().sum(-1)


def needs_resample(log_w: Tensor, adaptive: bool, threshold: float = 0.5) -> Tensor:
    """Which rows resample: all, or (adaptive) those with ESS < threshold * N (equal weights never: their ESS is
    N up to rounding, which a relative tolerance of 1e-9 absorbs)."""
    if not adaptive:
        return torch.ones(log_w.shape[:-1], dtype=torch.bool)
    return ess(log_w) < threshold * log_w.shape[-1] * (1 - 1e-9)


def resample_indices(log_w: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Multinomial resampling: N ancestor indices per row [P, N], one seeded generator per row."""
    if len(generators) != log_w.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {log_w.shape[0]} rows of weights")
    w = normalized_weights(log_w)
    n = log_w.shape[-1]
    return torch.stack([torch.multinomial(w[p], n, replacement=True, generator=g) for p, g in enumerate(generators)])


def select_proposals(values: Tensor) -> Tensor:
    """Index of the best of M proposals per particle: values [B, M] -> [B]."""
    return values.argmax(dim=-1)


def resample_steps(steps: int, every: int, start: float, end: float) -> list[int]:
    """Grid indices (times t_k after k steps) where particles are resampled: every `every` inside [start, end]."""
    if every <= 0:
        return []
    lo, hi = max(1, round(start * steps)), min(steps - 1, round(end * steps))
    return list(range(lo, hi + 1, every))


def proposal_steps(steps: int, fraction: float) -> list[int]:
    """Step indices k (transitions t_k -> t_k+1) that use M proposals: the first `fraction` of the grid."""
    return list(range(min(steps, math.ceil(fraction * steps - 1e-9))))


# ------------------------------------------------------------------------------------ compute accounting

# Network evaluations per latent of one value call, by estimator name.
VALUE_COSTS = {
    "stitchvm": {"stitchvm": 1},
    "tweedie": {"denoiser": 1, "decoder": 1, "reward": 1},
}


def value_cost(estimator) -> dict[str, int]:
    """Evaluations per latent of one value call of an estimator (Monte Carlo: K rollouts of its grid)."""
    name = estimator if isinstance(estimator, str) else getattr(estimator, "name", "")
    if name == "monte_carlo" and not isinstance(estimator, str):
        k, steps = estimator.k, estimator.sampler.steps
        return {"denoiser": k * steps, "decoder": k, "reward": k}
    return dict(VALUE_COSTS.get(name, {name or "value": 1}))


@dataclass
class EvalCounter:
    """Network evaluations, counted per latent (a batched call on B latents counts B)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, cost: dict[str, int], n: int) -> None:
        """Add n evaluations of each network in `cost` (weighted by its count)."""
        for k, c in cost.items():
            self.counts[k] = self.counts.get(k, 0) + c * n

    @property
    def total(self) -> int:
        """All evaluations together."""
        return sum(self.counts.values())


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class FKConfig:
    """Knobs of FK steering (particles N, proposals M) and Best-of-N (resample_every=0, proposals=1)."""

    particles: int = 4  # N per prompt
    proposals: int = 1  # M stochastic proposals per particle at proposal steps (1: off)
    potential: str = "diff"  # diff | max | add
    lam: float = 10.0  # lambda of the potential
    resample_every: int = 4  # k: resample every k steps inside the window (0: never, i.e. Best-of-N)
    window_start: float = 0.2  # resampling window as fractions of the grid (SPEC: 8..32 of 40)
    window_end: float = 0.8
    adaptive: bool = False  # resample only when ESS < ess_threshold * N
    ess_threshold: float = 0.5
    proposal_frac: float = 0.4  # the first 40% of the steps use M proposals
    final_select: str = "reward"  # reward (clean reward on decoded particles) | value (V at t=0) | none
    value_chunk: int = 256  # latents per value call

    def validate(self) -> None:
        """Clear errors naming the knob."""
        if self.particles < 1 or self.proposals < 1:
            raise ValueError(f"particles ({self.particles}) and proposals ({self.proposals}) must be >= 1")
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential={self.potential!r} is not one of {POTENTIALS}")
        if self.final_select not in FINAL_SELECT:
            raise ValueError(f"final_select={self.final_select!r} is not one of {FINAL_SELECT}")
        if not 0 <= self.window_start <= self.window_end <= 1:
            raise ValueError(f"need 0 <= window_start <= window_end <= 1, got {self.window_start}, {self.window_end}")
        if not self.lam >= 0 or self.resample_every < 0:  # lam < 0 would steer towards low values
            raise ValueError(f"lam ({self.lam}) and resample_every ({self.resample_every}) must be >= 0")
        if not 0 < self.ess_threshold <= 1 or not 0 <= self.proposal_frac <= 1 or self.value_chunk < 1:
            raise ValueError("ess_threshold must lie in (0, 1], proposal_frac in [0, 1], value_chunk >= 1")

    @property
    def uses_value(self) -> bool:
        """Whether the run calls the value model at all."""
        return self.resample_every > 0 or self.proposals > 1 or self.final_select == "value"


@dataclass
class FKOutput:
    """One selected sample per prompt, its clean reward, and what it cost."""

    latents: Tensor  # [P, C, H, W]
    images: Tensor  # [P, 3, H, W] in [-1, 1]
    rewards: Tensor  # [P] clean reward of the selected images
    particles: Tensor  # [P*N, C, H, W] final particles
    counter: EvalCounter
    ess: list[tuple[int, list[float]]] = field(default_factory=list)  # (grid index, ESS per prompt)
    resampled: int = 0  # rows (prompts) resampled in total


def _row_gens(gens: Sequence[torch.Generator], per: int) -> list[torch.Generator]:
    """Each prompt's generator repeated for its rows, so a prompt's noise does not depend on the others."""
    return [g for g in gens for _ in range(per)]


class _Values:
    """Chunked, counted, checked value calls."""

    def __init__(self, value_fn: ValueFn | None, cost: dict[str, int], counter: EvalCounter, chunk: int):
        self.fn, self.cost, self.counter, self.chunk = value_fn, cost, counter, chunk

    def __call__(self, z: Tensor, t: float, prompts: list[str]) -> Tensor:
        if self.fn is None:
            raise ValueError("this FK configuration needs a value model (value_fn)")
        out = torch.cat([self.fn(z[k : k + self.chunk], t, prompts[k : k + self.chunk]).detach().float().cpu()
                         for k in range(0, len(z), self.chunk)])
        if out.shape != (len(z),) or not bool(torch.isfinite(out).all()):
            raise ValueError(f"value model returned shape {tuple(out.shape)} (want ({len(z)},)) or non-finite values")
        self.counter.add(self.cost, len(z))
        return out


def _propose(sampler, z, v, t, tn, gens, m, values: _Values, prompts) -> tuple[Tensor, Tensor]:
    """M SDE proposals per particle from one velocity; keeps each particle's argmax under V."""
    zc = sampler.step(z.repeat_interleave(m, 0), v.repeat_interleave(m, 0), t, tn, _row_gens(gens, len(z) // len(gens) * m))
    vc = values(zc, tn, [p for p in prompts for _ in range(m)]).view(len(z), m)
    pick = select_proposals(vc)
    rows = torch.arange(len(z))
    return zc.view(len(z), m, *z.shape[1:])[rows, pick], vc[rows, pick]


def fk_steer(backbone, codec, reward, prompts: Sequence[str], cfg: FKConfig, *, value_fn: ValueFn | None = None,
             cost: dict[str, int] | None = None, sampler: FlowSampler | None = None, cfg_scale: float = 4.0,
             seeds: Sequence[int] | None = None, latent_hw: tuple[int, int] = (8, 8),
             counter: EvalCounter | None = None, progress: Callable[[int], None] | None = None) -> FKOutput:
    """FK steering of N particles per prompt (see the module docstring); each prompt's run depends only on its seed."""
    cfg.validate()
    sampler = sampler or FlowSampler(steps=20, sde=True)
    if not sampler.sde and (cfg.resample_every > 0 or cfg.proposals > 1):
        raise ValueError("FK resampling and proposals need a stochastic sampler (FlowSampler(sde=True))")
    P, N, M = len(prompts), cfg.particles, cfg.proposals
    seeds = list(range(P)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != P:
        raise ValueError(f"got {len(seeds)} seeds for {P} prompts")
    counter = counter if counter is not None else EvalCounter()
    values = _Values(value_fn, cost or {"value": 1}, counter, cfg.value_chunk)
    rows = [p for p in prompts for _ in range(N)]
    seeds_pn = [s * 100_003 + n for s in seeds for n in range(N)]
    z = initial_noise(backbone, P * N, latent_hw, seeds_pn).to(model_device(backbone))
    noise_gens = generators([s * 100_003 for s in seeds], SDE_SEED_OFFSET)
    pick_gens = generators([s * 100_003 for s in seeds], 104_729)
    res_at, prop_at = set(resample_steps(sampler.steps, cfg.resample_every, cfg.window_start, cfg.window_end)), set(
        proposal_steps(sampler.steps, cfg.proposal_frac) if M > 1 else [])
    grid = sampler.timesteps()
    state = initial_state(cfg.potential, (P, N))
    out = FKOutput(z, z, torch.zeros(P), z, counter)
    with torch.no_grad():
        velocity = cfg_velocity(backbone, backbone.encode_prompts(rows), cfg_scale)
        per_velocity = 1 if cfg_scale == 1.0 else 2
        for k in range(sampler.steps):
            t, tn = float(grid[k]), float(grid[k + 1])
            v = velocity(z, t)
            counter.add({"denoiser": per_velocity}, len(z))
            vals = None
            if k in prop_at:
                z, vals = _propose(sampler, z, v, t, tn, noise_gens, M, values, rows)
            else:
                z = sampler.step(z, v, t, tn, _row_gens(noise_gens, N))
            if k + 1 in res_at:
                vals = vals if vals is not None else values(z, tn, rows)
                z, state = _resample(z, vals.view(P, N), state, cfg, pick_gens, k + 1, out)
            if progress is not None:
                progress(1)
        return _finish(z, rows, P, N, cfg, codec, reward, values, out)


def _resample(z, vals, state, cfg: FKConfig, gens, k: int, out: FKOutput) -> tuple[Tensor, Tensor]:
    """Weight by the potential, resample the rows that need it, carry the state along the ancestry."""
    P, N = vals.shape
    score, state = potential(cfg.potential, vals, state)
    log_w = cfg.lam * score
    out.ess.append((k, ess(log_w).tolist()))
    do = needs_resample(log_w, cfg.adaptive, cfg.ess_threshold)
    idx = torch.arange(N).expand(P, N).clone()
    if bool(do.any()):
        idx[do] = resample_indices(log_w[do], [g for g, d in zip(gens, do.tolist()) if d])
        out.resampled += int(do.sum())
    flat = (idx + torch.arange(P)[:, None] * N).flatten()
    return z[flat], torch.gather(state, 1, idx)


def _finish(z, rows, P, N, cfg: FKConfig, codec, reward, values: _Values, out: FKOutput) -> FKOutput:
    """Pick each prompt's final particle and score the selected images with the clean reward."""
    counter = out.counter
    if cfg.final_select == "reward":
        images = codec.decode(z).clamp(-1, 1)
        scores = reward.score(images, rows).float().cpu()
        counter.add({"decoder": 1, "reward": 1}, len(z))
        pick = scores.view(P, N).argmax(-1) + torch.arange(P) * N
        out.images, out.rewards = images[pick], scores[pick]
    else:
        if cfg.final_select == "value":
            pick = values(z, 0.0, rows).view(P, N).argmax(-1) + torch.arange(P) * N
        else:
            pick = torch.arange(P) * N
        out.images = codec.decode(z[pick]).clamp(-1, 1)
        counter.add({"decoder": 1}, P)
        out.rewards = reward.score(out.images, [rows[i] for i in pick.tolist()]).float().cpu()
    out.latents, out.particles = z[pick], z
    return out


def best_of_n(backbone, codec, reward, prompts: Sequence[str], n: int, **kw) -> FKOutput:
    """Best-of-N: N independent samples per prompt, the best under the clean reward kept."""
    return fk_steer(backbone, codec, reward, prompts, FKConfig(particles=n, resample_every=0), **kw)
