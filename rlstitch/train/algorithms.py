"""The one algorithm registry: DiffusionNFT, DRaFT-K and Flow-GRPO, each one `Algorithm` that says everything the
trainer, the learner and the config checks need to know about it. Nothing else branches on an algorithm's name:
`algorithm(cfg)` looks it up (cfg.algorithm), and every difference between the three is a field here.

Ray-free: the trainer (actors/trainer) reads rollout kind, scoring and batch; the learner rank
(rlstitch/train/learner.py) reads step, accumulation, slots and the sampling slot; rlstitch/train/config.py the
checks and whether stale rollouts are allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rlstitch.train import config as C
from rlstitch.train.grpo import draw_window, group_advantages
from rlstitch.train.grpo_learner import grpo_accumulation, grpo_step
from rlstitch.train.lora import DEFAULT
from rlstitch.train.nft import optimality_probability


@dataclass(frozen=True)
class Algorithm:
    """One training algorithm, as the loop, the learner and the config checks see it."""

    name: str
    # the learner batch's tensors: {batch key: rollout result key, or (key, fallback) when the rollout may lack it}
    records: Mapping[str, str | tuple[str, str]]
    signal: Callable  # (cfg, reward) -> the batch's reward-derived tensors (NFT's r, GRPO's adv; none for DRaFT)
    step: Callable  # (learner, batch, rows, generator, first update?) -> stats of one optimizer step
    accumulation: Callable  # (cfg, samples per rank and update, micro-batch) -> backward passes per optimizer step
    problems: Callable  # cfg -> its config problems (one message each)
    method: str = "sample"  # the rollout workers' method (the rollout kind)
    scored: bool = True  # False: the value actors are not asked by the loop, the learner asks for dV/dz (DRaFT)
    fresh_only: str = ""  # why rollouts may not be stale (train.async_staleness must be 0); empty: staleness allowed
    slots: tuple[str, ...] = ()  # policy slots beside the trained weights ("old": NFT's old policy)
    sample_slot: str = DEFAULT  # the slot whose weights "sample" publishes (what rollouts are drawn with)
    pads_micro_batches: bool = False  # the last micro-batch is padded (no divisibility check)
    window: Callable | None = None  # (cfg, rng) -> a GRPO SDE window per draw
    job: Callable = field(default=lambda cfg: {})  # cfg -> extra fields of every rollout job (DRaFT's K)
    describe: Callable = field(default=lambda cfg: "")  # cfg -> its knobs in the run's first log line

    def batch(self, cfg, roll: dict, reward, prompts: list[str]) -> dict:
        """The learner's batch of a collected draw: the recorded tensors, the reward signal and the prompts."""
        pick = {k: src if isinstance(src, str) else (src[0] if src[0] in roll else src[1])
                for k, src in self.records.items()}
        return {k: roll[src] for k, src in pick.items()} | self.signal(cfg, reward) | {"prompts": prompts}


def nft_job(cfg) -> dict:
    """Per-sample flags of the rollouts that go on past tau to t=0 (nft.full_share of the groups, mode=stitch)."""
    P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    n = round(cfg.nft.full_share * P) if cfg.mode == "stitch" else 0
    return {"full": [k // G < n for k in range(P * G)]} if n else {}


# rollouts: G samples per prompt from the old policy, each stopped at its tau; scores: V(z_tau) from StitchVM, or
# the clean reward at t=0; learner: NFT steps on the bridge anchored at z_tau (nft.full_share: the rollouts that
# went on to t=0 anchor at z0, tau 0), then the old-policy EMA
NFT = Algorithm(
    "nft", {"z": ("z_anchor", "z"), "tau": ("tau_anchor", "tau")}, job=nft_job,
    signal=lambda cfg, reward: {"r": optimality_probability(reward, cfg.rollout.group_size, cfg.nft.adv_clip_max)},
    step=lambda learner, batch, rows, gen, first: learner._nft_step(batch, rows, gen),
    accumulation=lambda cfg, per_rank, micro: (per_rank // micro) * cfg.nft.timesteps_per_sample,
    problems=C.nft_problems, slots=("old",), sample_slot="old")

# rollouts without gradients, each to K steps before its stop (tau, or t=0 in the baseline); no separate scoring:
# the learner runs the last K steps with gradients and asks the value actors for dV/dz at the stop
DRAFT = Algorithm(
    "draft", {"z": "z", "stop": "stops"}, signal=lambda cfg, reward: {},
    step=lambda learner, batch, rows, gen, first: learner._draft_step(batch, rows),
    accumulation=lambda cfg, per_rank, micro: per_rank // micro,
    problems=C.draft_problems, scored=False,
    fresh_only="DRaFT backpropagates through the rollouts of the weights it trains, so they cannot be stale",
    job=lambda cfg: {"draft_k": cfg.draft.k}, describe=lambda cfg: f" K={cfg.draft.k}")

# rollouts: G samples per prompt, recorded SDE steps inside the draw's window, stopped at tau; scores: V(z_tau) from
# StitchVM, or the clean reward at t=0; learner: PPO-clipped ratio loss on a random subset of the recorded steps
GRPO = Algorithm(
    "grpo", {k: k for k in ("z_prev", "z_next", "logp", "steps")},
    signal=lambda cfg, reward: {"adv": group_advantages(reward, cfg.rollout.group_size, cfg.grpo.global_std)},
    step=lambda learner, batch, rows, gen, first: grpo_step(learner, batch, rows, gen, first=first),
    accumulation=lambda cfg, per_rank, micro: grpo_accumulation(per_rank, cfg.grpo.timesteps_per_sample,
                                                                cfg.train.micro_batch),
    problems=C.grpo_problems, method="sample_grpo", pads_micro_batches=True,
    window=lambda cfg, rng: draw_window(cfg.grpo.sde_window, cfg.grpo.window_size, rng))

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (NFT, DRAFT, GRPO)}


def algorithm(cfg) -> Algorithm:
    """The registered algorithm of a RecipeConfig (cfg.algorithm)."""
    try:
        return ALGORITHMS[cfg.algorithm]
    except KeyError:
        raise ValueError(f"unknown algorithm {cfg.algorithm!r}; known: {sorted(ALGORITHMS)}") from None
