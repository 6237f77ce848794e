"""The typed config of the training recipes (DiffusionNFT, DRaFT, Flow-GRPO), validated at start-up.

Every error names the knob to change. Load with `rlstitch.config.load_config(RecipeConfig, overrides, yaml)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlstitch.config import PRECISIONS, ConfigError
from rlstitch.placement import RoleSpec
from rlstitch.train.lora import ATTENTION_TARGETS


@dataclass
class ModelConfig:
    """The generator and its latent codec (registry names; paths for real weights)."""

    backbone: str = "tiny-flux"
    path: str | None = None
    codec: str = "tiny-vae"
    codec_path: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; float32 | bfloat16
    latent_size: int = 8  # latent H = W (tiny world: 8; SD3.5-M at 512 px: 64; FLUX at 512 px: 64)


@dataclass
class RewardConfig:
    """The training reward: a weighted sum of reward models; in mode=stitch one StitchVM per reward."""

    names: list[str] = field(default_factory=lambda: ["tiny-clip"])
    paths: list[str | None] = field(default_factory=list)  # empty: registry defaults
    weights: list[float] = field(default_factory=lambda: [1.0])
    stitches: list[str] = field(default_factory=lambda: ["tiny-flux_tiny-clip"])  # registry names or folders


@dataclass
class LoraConfig:
    """peft LoRA on the attention projections (enabled=false: full finetuning)."""

    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))


@dataclass
class SamplerConfig:
    """The rollout sampler (flow-matching Euler ODE, or SDE with sde=true)."""

    steps: int = 10
    schedule: str = "auto"  # auto: the backbone's pipeline schedule if it has a scheduler config, else static
    shift: float = 1.0  # schedule=static only: t' = s t / (1 + (s-1) t) on linspace(1, 0, steps+1)
    sde: bool = False
    noise_level: float = 2.0
    cfg_scale: float = 1.0  # DiffusionNFT is CFG-free: keep 1.0


@dataclass
class RolloutConfig:
    """How many samples an iteration draws and where they stop."""

    prompts_per_iteration: int = 8
    group_size: int = 8  # samples per prompt
    stop_window: list[int] = field(default_factory=lambda: [4, 6])  # mode=stitch: stop step uniform in [lo, hi]
    tau_per: str = "group"  # one stop draw per "group" (a prompt's samples) or per "sample"
    # train.async_staleness >= 1: each worker's share of an iteration runs as this many tasks (at most one per
    # sample), and the value actors score a task's latents as soon as it finishes (its object ref goes from rollout
    # to value actor) while the worker denoises the next. The synchronous loop runs one task per worker
    # (bit-identical to earlier versions).
    stream_chunks: int = 2


@dataclass
class TrainConfig:
    """Optimisation."""

    steps: int = 60  # optimizer steps in total
    updates_per_iteration: int = 1  # optimizer steps per rollout batch
    micro_batch: int = 32  # samples per forward/backward on one learner rank
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.9
    seed: int = 0
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; fp32 | bf16
    timeout_s: float = 1800.0  # longest wait for any learner collective / reply before failing loudly
    # 0: synchronous iterations (rollout -> score -> learn -> sync). k in {1, 2}: the rollouts and scores of
    # iterations n+1..n+k run while the learner updates on iteration n, so samples are up to k iterations stale
    # (workers switch weights only between iterations; train/staleness_* logs it). Not for DRaFT.
    async_staleness: int = 0


@dataclass
class NFTConfig:
    """DiffusionNFT (SPEC §3)."""

    beta: float = 1.0
    adv_clip_max: float = 5.0
    kl_weight: float = 1e-4
    timesteps_per_sample: int = 2
    t_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # t = tau + (1 - tau) U(lo, hi)
    old_decay_rate: float = 0.001  # rho = min(rate * step, max)
    old_decay_max: float = 0.5
    # the learner's x0 target for t > tau: "bridge" z_t - t u on the bridge from z_tau (the exact clean sample at
    # tau=0), or "tweedie" z_tau - tau v_old(z_tau), the old policy's estimate at z_tau: the same conditional
    # mean with less variance, for one more forward per sample (mode=stitch; at tau=0 both are z0)
    target: str = "bridge"
    # mode=stitch: the share of each iteration's prompt groups (the first round(share x prompts)) whose rollouts go on
    # past tau to t=0 after V(z_tau) is scored, so the learner also trains t < tau on them (forward path from z0)
    full_share: float = 0.0
    # mode=stitch, every rank_every iterations (0: never): roll rank_groups of the iteration's prompt groups on to
    # t=0, score them with the clean reward and log diag/rank_spearman, the Spearman correlation of V(z_tau) with
    # the clean reward within each group (averaged); diagnostic work, not counted as training compute
    rank_every: int = 0
    rank_groups: int = 2


@dataclass
class DraftConfig:
    """DRaFT-K (SPEC §3)."""

    k: int = 1
    reg_weight: float = 0.01


@dataclass
class GRPOConfig:
    """Flow-GRPO (rlstitch/train/grpo.py): SDE steps with log-probabilities inside a window, PPO-clipped ratios."""

    variant: str = "sde"  # sde: sigma_t = noise_level * sqrt(t / (1 - t)) | cps: coefficients-preserving
    noise_level: float = 0.7  # the SDE's a (cps: sigma_t = t_next * sin(a * pi / 2), a in (0, 1])
    clip_range: float = 1e-4  # PPO ratio clip: [1 - c, 1 + c]
    adv_clip_max: float = 5.0  # advantages clipped to +-adv_clip_max
    beta: float = 0.04  # weight of the closed-form KL to the reference policy (adapters off); 0: no KL
    global_std: bool = True  # advantages divide by the batch's std (False: by each prompt group's std)
    sde_window: list[int] = field(default_factory=lambda: [0, 4])  # SDE (recorded) at steps lo <= k < hi, ODE elsewhere
    window_size: int = 0  # 0: the whole sde_window each iteration; k: a random k-step sub-window per iteration
    timesteps_per_sample: int = 2  # recorded steps trained per sample and update (a random subset)


@dataclass
class DataConfig:
    """Training prompts: "tiny:train" or a text file with one prompt per line."""

    prompts: str = "tiny:train"
    num_prompts: int = 1024


@dataclass
class EvalConfig:
    """Clean-reward evaluation of fully denoised samples on held-out prompts, independent of the training signal."""

    every: int = 10  # iterations between evaluations (0: only at the start and the end)
    prompts: str = "tiny:test"
    num_prompts: int = 64
    rewards: list[str] = field(default_factory=lambda: ["tiny-clip"])
    reward_paths: list[str | None] = field(default_factory=list)
    seed: int = 1_000_000  # noise seeds of the evaluation samples (fixed across evaluations)
    grid: int = 16  # images in the logged sample grid
    use_ema: bool = False  # evaluate the EMA weights instead of the current ones


@dataclass
class CheckpointConfig:
    """Full checkpoints: adapters, old policy, EMA, optimizer, RNG, data position, step."""

    every: int = 0  # iterations between checkpoints (0: only at the end)
    resume: bool = True  # continue from the latest checkpoint under <out>/checkpoints
    keep: int = 2  # newest checkpoints kept on disk (0: every one)
    # a lost learner (a rank's process or its node) restarts the run from the latest checkpoint, at most this
    # often (0: the run fails); lost rollout / value workers restart on their own (placement.<role>.max_restarts)
    restarts: int = 3


@dataclass
class LogConfig:
    """wandb (offline works), progress bar, console."""

    wandb: bool = True
    project: str = "rlstitch"
    run_name: str | None = None
    progress: bool = True
    # on a cluster that outlives the job (ray job submit): seconds the driver stays up after the run, so that the
    # metrics it recorded last (its gauges are exported only while it lives) are pushed and scraped at least once
    metrics_linger_s: float = 15.0


@dataclass
class PlacementConfig:
    """Per-role placement; roles are the cluster files' custom resources rollout / value / learner."""

    rollout: RoleSpec = field(default_factory=lambda: RoleSpec(num_cpus=0.5, custom_resources={"rollout": 1}))
    value: RoleSpec = field(default_factory=lambda: RoleSpec(num_cpus=0.5, custom_resources={"value": 1}))
    learner: RoleSpec = field(default_factory=lambda: RoleSpec(num_cpus=1.0, custom_resources={"learner": 1}))


@dataclass
class RecipeConfig:
    """One training run."""

    recipe: str = "nft_flux"
    algorithm: str = "nft"  # nft | draft | grpo
    mode: str = "stitch"  # stitch: score z_tau with StitchVM; baseline: run to t=0 and score the decoded image
    out: str = "runs/nft_flux"
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    @property
    def batch_size(self) -> int:
        """Rollouts per iteration."""
        return self.rollout.prompts_per_iteration * self.rollout.group_size

    @property
    def iterations(self) -> int:
        """Iterations in the run."""
        return self.train.steps // self.train.updates_per_iteration

    @property
    def stop_window(self) -> list[int] | None:
        """The stop window in mode=stitch, None (run to t=0) in the baseline."""
        return list(self.rollout.stop_window) if self.mode == "stitch" else None

    def validate(self) -> None:
        """Check every knob and their couplings; each error names what to change."""
        errors = list(_problems(self))
        if errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def from_dict(cfg: RecipeConfig | dict) -> RecipeConfig:
    """A RecipeConfig from itself or its plain-dict form (as shipped to Ray actors)."""
    if isinstance(cfg, RecipeConfig):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.create(dict(cfg))))


def pick_dtype(name: str, cuda: bool):
    """model.dtype as a torch dtype: auto is bfloat16 on GPU and float32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _problems(c: RecipeConfig):
    """Yield one message per invalid knob."""
    from rlstitch.train.algorithms import ALGORITHMS

    algo = ALGORITHMS.get(c.algorithm)
    yield from _choice("algorithm", c.algorithm, tuple(ALGORITHMS))
    yield from _choice("mode", c.mode, ("stitch", "baseline"))
    yield from _choice("rollout.tau_per", c.rollout.tau_per, ("group", "sample"))
    yield from _choice("model.dtype", c.model.dtype, ("auto", "float32", "bfloat16"))
    yield from _choice("train.precision", c.train.precision, PRECISIONS)
    yield from _choice("train.zero_stage", c.train.zero_stage, (0, 1, 2))
    yield from _choice("train.async_staleness", c.train.async_staleness, (0, 1, 2))
    if algo is not None and algo.fresh_only and c.train.async_staleness:
        yield f"{algo.fresh_only}: set train.async_staleness=0 (got {c.train.async_staleness})"
    for name, v in [("train.steps", c.train.steps), ("train.updates_per_iteration", c.train.updates_per_iteration),
                    ("train.micro_batch", c.train.micro_batch), ("rollout.prompts_per_iteration",
                    c.rollout.prompts_per_iteration), ("rollout.group_size", c.rollout.group_size),
                    ("sampler.steps", c.sampler.steps), ("eval.num_prompts", c.eval.num_prompts),
                    ("data.num_prompts", c.data.num_prompts), ("nft.timesteps_per_sample", c.nft.timesteps_per_sample),
                    ("draft.k", c.draft.k), ("model.latent_size", c.model.latent_size),
                    ("rollout.stream_chunks", c.rollout.stream_chunks)]:
        if v < 1:
            yield f"{name} must be >= 1, got {v}"
    if not 0 <= c.log.metrics_linger_s <= 600:
        yield f"log.metrics_linger_s must be in [0, 600] seconds, got {c.log.metrics_linger_s}"
    if c.checkpoint.restarts < 0:
        yield f"checkpoint.restarts must be >= 0 (0: a lost learner fails the run), got {c.checkpoint.restarts}"
    if c.checkpoint.keep < 0:
        yield f"checkpoint.keep must be >= 0 (0 keeps every checkpoint), got {c.checkpoint.keep}"
    if not c.sampler.shift > 0:
        yield f"sampler.shift must be > 0 (1: no shift), got {c.sampler.shift}"
    else:
        from rlstitch.sampling.schedule import resolve

        try:
            resolve(c.sampler.schedule, c.model.backbone, c.model.path, c.sampler.shift)
        except (KeyError, ValueError) as e:
            yield str(e).strip("\"'")
    for name, names in [("reward.names", c.reward.names), ("eval.rewards", c.eval.rewards)]:
        if len(set(names)) != len(names):  # results are keyed by name: a repeated one would be dropped silently
            yield f"{name}={list(names)} repeats a reward: list each once (weight it with reward.weights)"
    if c.train.steps % max(c.train.updates_per_iteration, 1):
        yield (f"train.steps={c.train.steps} is not a multiple of train.updates_per_iteration="
               f"{c.train.updates_per_iteration}: change either")
    for role in ("rollout", "value", "learner"):
        yield from getattr(c.placement, role).problems(f"placement.{role}")
    n_roll, n_learn = c.placement.rollout.num_workers, c.placement.learner.num_workers
    if c.rollout.prompts_per_iteration % max(n_roll, 1):
        yield (f"rollout.prompts_per_iteration={c.rollout.prompts_per_iteration} is not divisible by "
               f"placement.rollout.num_workers={n_roll} (each worker samples whole prompt groups): change either")
    per_update = c.batch_size // max(c.train.updates_per_iteration, 1)
    if c.batch_size % max(c.train.updates_per_iteration, 1):
        yield (f"batch {c.batch_size} (rollout.prompts_per_iteration x rollout.group_size) is not divisible by "
               f"train.updates_per_iteration={c.train.updates_per_iteration}")
    elif per_update % max(n_learn, 1):
        yield (f"the {per_update} samples of one update are not divisible by placement.learner.num_workers="
               f"{n_learn}: change rollout.prompts_per_iteration, rollout.group_size or the learner count")
    # GRPO pads its last micro-batch of (sample, step) pairs instead (rlstitch/train/grpo_learner.py).
    elif algo is not None and not algo.pads_micro_batches and (per_update // max(n_learn, 1)) % min(max(c.train.micro_batch, 1), per_update // max(n_learn, 1)):
        yield (f"the {per_update // max(n_learn, 1)} samples per learner rank and update are not divisible by "
               f"train.micro_batch={c.train.micro_batch}")
    if algo is not None:
        yield from algo.problems(c)
    if c.mode == "stitch":
        w = list(c.rollout.stop_window)
        if len(w) != 2 or not 1 <= w[0] <= w[1] <= c.sampler.steps:
            yield (f"rollout.stop_window={w} must be [lo, hi] with 1 <= lo <= hi <= sampler.steps={c.sampler.steps} "
                   f"(stop steps inside the schedule)")
        elif w[1] == c.sampler.steps:
            yield f"rollout.stop_window={w} reaches t=0: use mode=baseline to score clean samples"
        if len(c.reward.stitches) != len(c.reward.names):
            yield (f"mode=stitch needs one StitchVM per reward: reward.stitches has {len(c.reward.stitches)} "
                   f"entries, reward.names {len(c.reward.names)}")
    if len(c.reward.weights) != len(c.reward.names):
        yield f"reward.weights has {len(c.reward.weights)} entries for {len(c.reward.names)} reward.names"
    if c.reward.paths and len(c.reward.paths) != len(c.reward.names):
        yield f"reward.paths has {len(c.reward.paths)} entries for {len(c.reward.names)} reward.names (or leave it empty)"
    if c.eval.reward_paths and len(c.eval.reward_paths) != len(c.eval.rewards):
        yield f"eval.reward_paths has {len(c.eval.reward_paths)} entries for {len(c.eval.rewards)} eval.rewards"
    if not c.eval.rewards:
        yield "eval.rewards must name at least one clean reward model"
    if c.eval.every < 0 or c.checkpoint.every < 0:
        yield "eval.every and checkpoint.every must be >= 0"
    if c.lora.enabled and c.lora.rank < 1:
        yield f"lora.rank must be >= 1, got {c.lora.rank}"
    if not 0 <= c.train.ema_decay < 1:
        yield f"train.ema_decay must be in [0, 1), got {c.train.ema_decay}"


def flow_sampler(c: RecipeConfig):
    """The run's FlowSampler: sampler.* on the schedule of sampler.schedule at model.latent_size."""
    from rlstitch.sampling.flow import FlowSampler
    from rlstitch.sampling.schedule import sampling_grid

    s, hw = c.sampler, (c.model.latent_size, c.model.latent_size)
    grid = sampling_grid(s.schedule, c.model.backbone, c.model.path, s.steps, s.shift, hw)
    return FlowSampler(s.steps, s.shift, s.sde, s.noise_level, grid=grid)


def nft_problems(c: RecipeConfig):
    """Yield one message per invalid DiffusionNFT knob."""
    if c.rollout.group_size < 2:
        yield "rollout.group_size must be >= 2 for DiffusionNFT (rewards are compared within a prompt's group)"
    if c.sampler.cfg_scale != 1.0:
        yield f"DiffusionNFT samples without CFG: set sampler.cfg_scale=1.0 (got {c.sampler.cfg_scale})"
    lo, hi = (list(c.nft.t_range) + [None, None])[:2]
    if lo is None or hi is None or not 0.0 <= lo < hi <= 1.0:
        yield f"nft.t_range must be [lo, hi] with 0 <= lo < hi <= 1, got {list(c.nft.t_range)}"
    if c.nft.beta <= 0:
        yield f"nft.beta must be > 0, got {c.nft.beta}"
    if c.nft.adv_clip_max <= 0:
        yield f"nft.adv_clip_max must be > 0, got {c.nft.adv_clip_max}"
    if not 0 <= c.nft.old_decay_max < 1:
        yield f"nft.old_decay_max must be in [0, 1), got {c.nft.old_decay_max}"
    yield from _choice("nft.target", c.nft.target, ("bridge", "tweedie"))
    if not 0.0 <= c.nft.full_share <= 1.0:
        yield f"nft.full_share must be in [0, 1], got {c.nft.full_share}"
    if c.nft.rank_every < 0 or not 1 <= c.nft.rank_groups <= c.rollout.prompts_per_iteration:
        yield (f"nft.rank_every ({c.nft.rank_every}) must be >= 0 and nft.rank_groups ({c.nft.rank_groups}) in "
               f"1..rollout.prompts_per_iteration={c.rollout.prompts_per_iteration}")
    if c.nft.kl_weight < 0 or c.nft.old_decay_rate < 0:
        yield (f"nft.kl_weight ({c.nft.kl_weight}) and nft.old_decay_rate ({c.nft.old_decay_rate}) must be >= 0 "
               "(a negative weight rewards moving away from the reference)")


def draft_problems(c: RecipeConfig):
    """Yield one message per invalid DRaFT knob."""
    if c.draft.k > c.sampler.steps:
        yield f"draft.k={c.draft.k} exceeds sampler.steps={c.sampler.steps}"
    if c.mode == "stitch" and len(c.rollout.stop_window) == 2 and c.draft.k > c.rollout.stop_window[0]:
        yield f"draft.k={c.draft.k} is larger than the earliest stop step rollout.stop_window[0]={c.rollout.stop_window[0]}"
    if c.sampler.sde:
        yield "DRaFT backpropagates through the ODE sampler: set sampler.sde=false"
    if c.sampler.cfg_scale != 1.0:
        yield f"DRaFT differentiates the conditional velocity only: set sampler.cfg_scale=1.0 (got {c.sampler.cfg_scale})"


def grpo_problems(c: RecipeConfig):
    """Yield one message per invalid Flow-GRPO knob (every recorded step must lie before every stop)."""
    g, steps = c.grpo, c.sampler.steps
    yield from _choice("grpo.variant", g.variant, ("sde", "cps"))
    if c.rollout.group_size < 2:
        yield "rollout.group_size must be >= 2 for Flow-GRPO (advantages compare a prompt's samples)"
    if c.sampler.cfg_scale != 1.0:
        yield f"Flow-GRPO here samples and trains without CFG: set sampler.cfg_scale=1.0 (got {c.sampler.cfg_scale})"
    if c.sampler.sde:
        yield "Flow-GRPO brings its own SDE inside grpo.sde_window: set sampler.sde=false (ODE outside the window)"
    if not g.noise_level > 0 or (g.variant == "cps" and g.noise_level > 1):
        yield f"grpo.noise_level must be > 0 (cps: in (0, 1]), got {g.noise_level}"
    if not g.clip_range > 0 or not g.adv_clip_max > 0 or g.beta < 0:
        yield (f"grpo.clip_range ({g.clip_range}) and grpo.adv_clip_max ({g.adv_clip_max}) must be > 0, "
               f"grpo.beta ({g.beta}) >= 0")
    w = list(g.sde_window)
    last = c.rollout.stop_window[0] if c.mode == "stitch" and len(c.rollout.stop_window) == 2 else steps
    last = min(last, steps - 1) if g.variant == "cps" else last  # cps has zero noise on the step to t=0
    if len(w) != 2 or not 0 <= w[0] < w[1] <= last:
        yield (f"grpo.sde_window={w} must be [lo, hi] with 0 <= lo < hi <= {last} (SDE steps end before the "
               "earliest stop rollout.stop_window[0] in mode=stitch, before t=0's step with cps)")
        return
    span = g.window_size or w[1] - w[0]
    if not 0 <= g.window_size <= w[1] - w[0]:
        yield f"grpo.window_size={g.window_size} must be in 0..{w[1] - w[0]} (the sde_window's length)"
    elif not 1 <= g.timesteps_per_sample <= span:
        yield f"grpo.timesteps_per_sample={g.timesteps_per_sample} must be in 1..{span} (SDE steps per rollout)"


def _choice(name: str, value, allowed) -> list[str]:
    """One message if value is not among the allowed ones."""
    return [] if value in allowed else [f"{name} must be one of {list(allowed)}, got {value!r}"]
