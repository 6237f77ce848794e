"""Rollout workers: the generator (base + LoRA) sampling groups of prompts to their stop steps, on Ray.

Weights travel with the work: the learner puts each version once in the object store, and every rollout task
carries the refs of the weights it must be sampled with (plus the first, full sync: base + adapter). A worker
loads them only when it does not hold them yet, so a worker that Ray restarted after a crash (or re-placed on
another node) re-runs a lost task with exactly the weights it was submitted under, and the result is the same to
the last bit. Each result reports the weight version it was sampled with, so the driver can check that every
rollout used the weights it was submitted under.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import ray
import torch
from torch import Tensor

from actors.group import ActorGroup, get_within
from actors.metrics import record, zero_counters
from rlstitch.placement import RoleSpec
from rlstitch.sampling.flow import SDE_SEED_OFFSET, generators
from rlstitch.sampling.generate import initial_noise
from rlstitch.train.config import RecipeConfig, flow_sampler, from_dict, pick_dtype
from rlstitch.train.cost import delta
from rlstitch.train.policy import Policy, continue_to_end, sample_to_stops, stop_times

EVAL = "evaluation"  # the adapter slot evaluations sample with (current or EMA weights); "eval" is taken by nn.Module
ROLLOUT_COUNTERS = ("rlstitch_rollouts_total", "rlstitch_denoise_steps_total", "rlstitch_denoise_steps_saved_total")


class RolloutWorker:
    """One rollout process: policy weights in slots "default" (sampling) and "eval", plus the codec for grids."""

    def __init__(self, cfg: Mapping | RecipeConfig, rank: int = 0, world_size: int = 1, tiny_dir: str | None = None,
                 tags: Mapping[str, str] | None = None):
        from rlstitch.models.registry import load_backbone, load_codec

        if tiny_dir:
            os.environ["RLSTITCH_TINY_DIR"] = tiny_dir
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.cfg, self.rank, self.world_size = from_dict(cfg), rank, world_size
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        m = self.cfg.model
        backbone = load_backbone(m.backbone, m.path, dtype=pick_dtype(m.dtype, cuda), device=self.device)
        lo = self.cfg.lora
        self.policy = Policy(backbone, lo.enabled, lo.rank, lo.alpha, lo.targets, slots=(EVAL,), seed=self.cfg.train.seed)
        self.policy.requires_grad_(False)
        self.codec = load_codec(m.codec, m.codec_path, device=self.device)
        self.sampler = flow_sampler(self.cfg)
        self.versions = {"default": -1, EVAL: -1}
        self.has_base = False  # the frozen base weights arrive with the first (full) sync
        self.tags = {"role": "rollout", "recipe": self.cfg.recipe, "run": "", **dict(tags or {})}
        if ray.is_initialized():  # at 0 before the first rollout: a short run's counters still show a rate
            zero_counters(ROLLOUT_COUNTERS, self.tags)

    # -- weights ---------------------------------------------------------------------------------
    def set_weights(self, payload: Mapping) -> dict:
        """Load {"version", "slot", "adapter", "base" (first sync only)}; returns what was loaded."""
        slot = payload.get("slot", "default")
        if payload.get("base") is not None:
            self.policy.load_base_state(payload["base"])
            self.has_base = True
        elif not self.has_base:
            raise RuntimeError("the first weight sync must be a full one (base + adapter)")
        self.policy.load_state(payload["adapter"], slot)
        self.versions[slot] = int(payload["version"])
        return {"rank": self.rank, "slot": slot, "version": self.versions[slot]}

    def _use(self, weights: Mapping | None, slot: str) -> None:
        """Load the weights a job carries ({"version", "ref", "base"}: object refs, or the payloads themselves)
        into `slot`, unless this worker holds them already: the full sync first if it has no base weights yet."""
        if weights is None:
            return
        if not self.has_base:
            self.set_weights(_fetch(weights["base"]))
        if self.versions[slot] != int(weights["version"]):
            self.set_weights(dict(_fetch(weights["ref"])) | {"slot": slot})

    # -- sampling --------------------------------------------------------------------------------
    def _velocity(self, prompts: Sequence[str], slot: str, one_by_one: bool = False):
        """velocity(z, t, rows) for a batch of prompts under a slot's weights; one_by_one encodes each prompt
        alone, as the learner does (text-encoder kernels can depend on the batch size)."""
        if one_by_one:
            from rlstitch.models.condition import Condition

            cond = Condition.cat([self.policy.backbone.encode_prompts([p]) for p in prompts]).to(self.device)
        else:
            cond = self.policy.backbone.encode_prompts(list(prompts)).to(self.device)

        def velocity(z: Tensor, t: float, rows: Tensor) -> Tensor:
            c = type(cond)(cond.tokens[rows.to(self.device)], cond.pooled[rows.to(self.device)])
            return self.policy.velocity(z.to(self.device), t, c, slot)

        return velocity

    def _noise(self, seeds: Sequence[int], sde: bool = False) -> tuple[Tensor, list | None]:
        """z_1 and the SDE generators (with the sampler's SDE or sde=True), both from per-sample seeds
        (batch-split invariant)."""
        hw = (self.cfg.model.latent_size, self.cfg.model.latent_size)
        z = initial_noise(self.policy.backbone, len(seeds), hw, seeds).to(self.device)
        gens = generators(seeds, SDE_SEED_OFFSET) if self.sampler.sde or sde else None
        return z, gens

    @torch.no_grad()
    def sample(self, job: Mapping) -> dict:
        """Roll out {"prompts", "seeds", "stops"} with the sampling weights; returns latents at the stops.

        With "draft_k", latents are returned K steps before each stop (the learner runs the last K with grad).
        """
        self._use(job.get("weights"), "default")
        if self.versions["default"] < 0:
            raise RuntimeError(f"rollout worker {self.rank} has no weights yet: sync before sampling")
        prompts, seeds, stops = list(job["prompts"]), list(job["seeds"]), list(job["stops"])
        k = int(job.get("draft_k") or 0)
        run_to = [max(s - k, 0) for s in stops]
        z, gens = self._noise(seeds)
        before = dict(self.policy.backbone.work)
        velocity = self._velocity(prompts, "default")
        z = sample_to_stops(velocity, z, self.sampler, run_to, gens)
        done = sum(run_to)
        out = {"z": z.float().cpu(), "tau": stop_times(self.sampler, stops), "stops": torch.tensor(stops)}
        if "full" in job:  # nft.full_share: these also roll on to t=0, the anchor the learner trains on
            full = torch.tensor(job["full"], dtype=torch.bool)
            starts = [s if f else self.sampler.steps for s, f in zip(stops, job["full"])]
            z0 = continue_to_end(velocity, z, self.sampler, starts, gens)
            out |= {"z_anchor": torch.where(full[:, None, None, None], z0.float().cpu(), out["z"]),
                    "tau_anchor": torch.where(full, torch.zeros(()), out["tau"])}
            done += sum(self.sampler.steps - s for s in starts)
        self._record(len(prompts), done, self.sampler.steps * len(prompts) - sum(stops))
        return out | {"version": self.versions["default"], "rank": self.rank, "denoise_steps": done,
                      "work": delta(self.policy.backbone.work, before)}

    @torch.no_grad()
    def sample_grpo(self, job: Mapping) -> dict:
        """Flow-GRPO rollouts of {"prompts", "seeds", "stops", "window"}: SDE steps inside the window recorded
        (latents before/after, step index, log-probability), ODE elsewhere, each sample stopped at its stop."""
        from rlstitch.train.grpo_rollout import sample_recorded

        self._use(job.get("weights"), "default")
        if self.versions["default"] < 0:
            raise RuntimeError(f"rollout worker {self.rank} has no weights yet: sync before sampling")
        prompts, seeds, stops = list(job["prompts"]), list(job["seeds"]), list(job["stops"])
        z, gens = self._noise(seeds, sde=True)
        g = self.cfg.grpo
        before = dict(self.policy.backbone.work)
        rec = sample_recorded(self._velocity(prompts, "default", one_by_one=True), z, self.sampler.timesteps(), stops,
                              tuple(job["window"]), self.cfg.train.micro_batch, gens, g.variant, g.noise_level)
        self._record(len(prompts), sum(stops), self.sampler.steps * len(prompts) - sum(stops))
        return {k: v.float().cpu() if v.is_floating_point() else v for k, v in rec.items()} | {
            "tau": stop_times(self.sampler, stops), "stops": torch.tensor(stops), "version": self.versions["default"],
            "rank": self.rank, "denoise_steps": sum(stops), "work": delta(self.policy.backbone.work, before)}

    @torch.no_grad()
    def generate(self, job: Mapping) -> dict:
        """Fully denoised samples of {"prompts", "seeds"} with the eval weights; images for the first "grid"."""
        self._use(job.get("weights"), EVAL)
        if self.versions[EVAL] < 0:
            raise RuntimeError(f"rollout worker {self.rank} has no eval weights: sync slot 'eval' first")
        prompts, seeds = list(job["prompts"]), list(job["seeds"])
        z, gens = self._noise(seeds)
        z = sample_to_stops(self._velocity(prompts, EVAL), z, self.sampler, [self.sampler.steps] * len(z), gens)
        n = int(job.get("grid", 0))
        images = self.codec.decode(z[:n]).clamp(-1, 1).float().cpu() if n else None
        return {"z": z.float().cpu(), "images": images, "version": self.versions[EVAL]}

    def _record(self, rollouts: int, steps: int, saved: int) -> None:
        """Dashboard counters (only inside Ray)."""
        if not ray.is_initialized():
            return
        for name, value in zip(ROLLOUT_COUNTERS, (rollouts, steps, saved)):
            if value > 0:  # Ray counters only take positive increments
                record(name, value, self.tags)


def _fetch(ref):
    """An object ref's value (a payload passed in-process is used as it is)."""
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def weights_payload(version: int, adapter: dict, slot: str = "default", base: dict | None = None) -> dict:
    """What RolloutWorker.set_weights loads (put once in the object store, fetched by every worker)."""
    return {"version": version, "slot": slot, "adapter": adapter, "base": base}


def _bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """[a, b) of `chunks` contiguous near-equal pieces of n items (no empty piece)."""
    chunks = max(1, min(chunks, n))
    edges = [n * k // chunks for k in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


class RolloutGroup:
    """The rollout workers (one ActorGroup): weight syncs, sampling split by prompt groups, evaluation samples."""

    def __init__(self, cfg: RecipeConfig, role: RoleSpec, tags: Mapping[str, str], tiny_dir: str | None = None):
        from rlstitch.config import to_dict

        self.cfg, self.tags = cfg, dict(tags)
        self.group = ActorGroup(RolloutWorker, role, to_dict(cfg), tiny_dir=tiny_dir, tags=self.tags, role="rollout")
        self.base = None  # the ref of the full sync (base + adapter), which a fresh or restarted worker loads first
        self.weights: dict[str, dict] = {}  # slot -> {"version", "ref"}: what the next tasks of that slot carry

    def __len__(self) -> int:
        return len(self.group)

    def set_published(self, published: dict, version: int, slot: str = "default", full: bool = False) -> dict:
        """The weights the learner published ({"ref", "bytes"}: one object-store copy; with the base weights when
        `full`) become what the next tasks of `slot` carry; each worker fetches them itself, before the first task
        that needs them. Tasks submitted earlier keep the weights they were submitted with, so a sync lands
        between iterations. The first sync must be full."""
        start = time.perf_counter()
        if full:
            self.base = published["ref"]
        elif self.base is None:
            raise RuntimeError("the first weight sync must be a full one (base + adapter): publish with full=True")
        self.weights[slot] = {"version": version, "ref": published["ref"]}
        sent = published["bytes"] * len(self)
        seconds = time.perf_counter() - start
        record("rlstitch_weight_sync_s", seconds, self.tags | {"role": "rollout"})
        if sent:
            record("rlstitch_weight_sync_bytes_total", sent, self.tags | {"role": "rollout"})
        return {"seconds": seconds, "bytes": sent, "full": full, "version": version, "slot": slot}

    def carried(self, slot: str, version: int | None = None) -> dict:
        """The weights a task of `slot` carries ({"version", "ref", "base"}); checks the version when given."""
        if slot not in self.weights:
            raise RuntimeError(f"no weights published for slot {slot!r} yet: publish before sampling")
        w = self.weights[slot]
        if version is not None and w["version"] != version:
            raise RuntimeError(f"a task of weight version {version} would carry version {w['version']}")
        return w | {"base": self.base}

    def _split(self, items: Sequence) -> list[list]:
        """Contiguous, equal chunks per worker (whole prompt groups stay on one worker)."""
        n = len(self.group)
        size = len(items) // n
        return [list(items[k * size : (k + 1) * size]) for k in range(n)]

    def submit(self, method: str, prompts: Sequence[str], seeds: Sequence[int], stops: Sequence[int], chunks: int = 1,
               version: int | None = None, **extra) -> list[tuple]:
        """Start `method` ("sample" or "sample_grpo") on the batch with the latest published weights (of `version`,
        when given): worker k gets job k (whole prompt groups), split into `chunks` tasks that finish one after the
        other. Returns (object ref, its prompts) per task, in batch order; nothing is waited for."""
        extra["weights"] = self.carried("default", version)
        anchors = "full" in extra  # per sample: also roll on to t=0 (every task then returns anchors)
        full = self._split(extra.pop("full", None) or [False] * len(prompts))
        tasks = []
        for worker, p, s, t, f in zip(self.group.workers, self._split(prompts), self._split(seeds), self._split(stops),
                                      full):
            for a, b in _bounds(len(p), chunks):
                job = {"prompts": p[a:b], "seeds": s[a:b], "stops": t[a:b], **extra} | (
                    {"full": f[a:b]} if anchors else {})
                tasks.append((getattr(worker, method).remote(job), p[a:b]))
        return tasks

    def collect(self, tasks: Sequence[tuple], version: int) -> dict:
        """The submitted tasks' rollouts as one batch (tensors concatenated, "versions": the weight version of each
        sample); fails if any task sampled with other weights than `version`."""
        parts = get_within([ref for ref, _ in tasks], self.cfg.train.timeout_s, "rollout workers did not finish",
                           "raise train.timeout_s")
        stale = sorted({p["version"] for p in parts} - {version})
        if stale:
            raise RuntimeError(f"rollouts sampled with weight versions {stale}, expected {version}")
        out = {k: torch.cat([p[k] for p in parts]) for k, v in parts[0].items() if isinstance(v, Tensor)}
        return out | {"versions": torch.cat([torch.full((len(p["stops"]),), p["version"]) for p in parts]),
                      "version": version, "denoise_steps": sum(p["denoise_steps"] for p in parts),
                      "work": dict(sum((Counter(p["work"]) for p in parts), Counter()))}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], grid: int = 0) -> dict:
        """Fully denoised evaluation samples (eval weights) across the workers, images of the first `grid`."""
        n, weights = len(self.group), self.carried(EVAL)
        chunks = [list(range(len(prompts)))[k::n] for k in range(n)]
        jobs = [{"prompts": [prompts[i] for i in c], "seeds": [seeds[i] for i in c], "grid": grid if k == 0 else 0,
                 "weights": weights} for k, c in enumerate(chunks)]
        parts = self.group.map("generate", jobs, timeout=self.cfg.train.timeout_s)  # chunk k on worker k
        z = torch.empty(len(prompts), *parts[0]["z"].shape[1:])
        for c, p in zip(chunks, parts):
            z[c] = p["z"]
        return {"z": z, "images": parts[0]["images"], "prompts": [prompts[i] for i in chunks[0][:grid]]}

    def shutdown(self) -> None:
        """Kill the workers."""
        self.group.shutdown()
