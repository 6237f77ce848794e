"""One data-parallel learner rank, Ray-free: the policy, its optimizer engine (DeepSpeed ZeRO or plain torch
AdamW, same step semantics), the EMA and old-policy weights, and the DiffusionNFT / DRaFT / Flow-GRPO updates.

actors/learner.py runs one of these per Ray Train worker. Every rank receives the whole iteration batch and
takes its own slice, so the split (and the result) depends only on the seed, the step and the rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rlstitch import checkpoint as ckpt
from rlstitch.train import lora as L
from rlstitch.train.algorithms import algorithm
from rlstitch.train.config import RecipeConfig, flow_sampler
from rlstitch.train.cost import delta
from rlstitch.train.draft import draft_surrogate, truncated_rollout
from rlstitch.train.ds_config import deepspeed_config
from rlstitch.train.nft import bridge_point, nft_loss, old_policy_decay, sample_train_times, tweedie_x0
from rlstitch.train.policy import REF, Policy

ValueGrad = Callable[[Tensor, Tensor, Sequence[str]], tuple[Tensor, Tensor]]


def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def micro_batches(cfg: RecipeConfig, world_size: int) -> tuple[int, int]:
    """(samples per rank and update, micro-batch size)."""
    per_rank = cfg.batch_size // cfg.train.updates_per_iteration // world_size
    return per_rank, min(cfg.train.micro_batch, per_rank)


def accumulation_steps(cfg: RecipeConfig, world_size: int) -> int:
    """Backward passes per optimizer step on one rank (micro-batches x NFT training times)."""
    per_rank, micro = micro_batches(cfg, world_size)
    return algorithm(cfg).accumulation(cfg, per_rank, micro)


# ------------------------------------------------------------------------------------------- engines


class TorchEngine:
    """AdamW with gradient accumulation and norm clipping (the DeepSpeed engine's semantics, one process)."""

    def __init__(self, module, params: list, cfg: RecipeConfig, gas: int):
        self.module, self.params, self.gas, self.clip = module, params, gas, cfg.train.grad_clip
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                           weight_decay=cfg.train.weight_decay)
        self.micro, self.grad_norm = 0, 0.0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        """Accumulate loss / gas."""
        (loss / self.gas).backward()

    def step(self) -> bool:
        """Count a micro-step; at the accumulation boundary clip, update and zero the gradients."""
        self.micro += 1
        if self.micro % self.gas:
            return False
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def optimizer_state(self) -> tuple[dict, dict]:
        """Optimizer tensors (copies: the optimizer updates its own in place) and JSON-able scalars."""
        tensors, scalars = ckpt.optimizer_tensors(self.optimizer)
        return {k: v.detach().cpu().clone() for k, v in tensors.items()}, scalars

    def load_optimizer_state(self, tensors: dict, scalars: dict) -> None:
        """Inverse of optimizer_state (after the weights are loaded)."""
        ckpt.restore_optimizer(self.optimizer, tensors, scalars)


class DeepSpeedEngine:
    """deepspeed.initialize around the policy: ZeRO stage 1/2 data parallelism over the Ray Train process group."""

    def __init__(self, module, params: list, cfg: RecipeConfig, gas: int, world_size: int, bf16: bool, backend: str):
        import deepspeed

        if backend == "gloo" and world_size == 1:
            # DeepSpeed's shared-memory all-reduce op only speeds up several CPU ranks; one rank skips its C++ build.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _, micro = micro_batches(cfg, world_size)
        config = deepspeed_config(micro, gas, world_size, cfg.train.zero_stage, bf16, cfg.train.grad_clip, backend)
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=config,
                                                                 dist_init_required=False)
        self.grad_norm = 0.0

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        """DeepSpeed's backward (scales by 1/gas and reduces gradients across ranks)."""
        self.engine.backward(loss)

    def step(self) -> bool:
        """DeepSpeed's step: the optimizer runs at the accumulation boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else 0.0
        return boundary

    def _base(self):
        """The torch optimizer DeepSpeed drives (over fp32 master partitions under ZeRO)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def optimizer_state(self) -> tuple[dict, dict]:
        """This rank's optimizer moments plus its fp32 master partition (ZeRO), without pickle."""
        tensors, scalars = ckpt.optimizer_tensors(self._base())
        tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        for i, part in enumerate(getattr(self.optimizer, "single_partition_of_fp32_groups", [])):
            tensors[f"master.{i}"] = part.detach().cpu().clone()
        return tensors, scalars

    @torch.no_grad()
    def load_optimizer_state(self, tensors: dict, scalars: dict) -> None:
        """Restore moments and the fp32 master partition (the module weights must already be loaded)."""
        for i, part in enumerate(getattr(self.optimizer, "single_partition_of_fp32_groups", [])):
            part.copy_(tensors[f"master.{i}"].to(part.device, part.dtype))
        ckpt.restore_optimizer(self._base(), {k: v for k, v in tensors.items() if k.startswith("opt.")}, scalars)


# ------------------------------------------------------------------------------------------- learner


class Learner:
    """The training side of one rank: `update(batch)` runs one iteration's optimizer steps."""

    def __init__(self, cfg: RecipeConfig, policy: Policy, engine, rank: int = 0, world_size: int = 1,
                 value: ValueGrad | None = None, device: str | torch.device = "cpu"):
        self.algo = algorithm(cfg)
        if not self.algo.scored and value is None:
            raise ValueError(f"{cfg.algorithm} needs a value function (z, t, prompts) -> (V, dV/dz)")
        self.cfg, self.policy, self.engine, self.value = cfg, policy, engine, value
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.steps_done = 0
        self.value_rows = 0  # rows through the value function's gradient in the current update
        self.ema = {k: v.detach().clone().float() for k, v in policy.named_trainable().items()}
        self.grid = flow_sampler(cfg).timesteps()
        self._cond: dict[str, object] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def cond(self, prompts: Sequence[str]):
        """Text conditions for prompts (cached: the text encoder is frozen)."""
        from rlstitch.models.condition import Condition

        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond]
        for p in missing:  # one at a time: batch-dependent kernels would make a resumed run drift by ulps
            with torch.no_grad():
                c = self.policy.backbone.encode_prompts([p])
            self._cond[p] = Condition(c.tokens.cpu(), c.pooled.cpu())
        return Condition.cat([self._cond[p] for p in prompts]).to(self.device)

    def _rows(self, n: int, iteration_seed: int) -> list[Tensor]:
        """This rank's sample indices for each update of the iteration (a seeded shuffle, then split)."""
        U = self.cfg.train.updates_per_iteration
        order = torch.randperm(n, generator=torch.Generator().manual_seed(iteration_seed))
        per_update = n // U
        return [order[u * per_update : (u + 1) * per_update].chunk(self.world_size)[self.rank] for u in range(U)]

    # -- the update ------------------------------------------------------------------------------
    def update(self, batch: dict) -> dict:
        """One iteration: `updates_per_iteration` optimizer steps on this rank's slices, then the old policy."""
        n = len(batch["prompts"])
        stats: dict[str, float] = {}
        before, self.value_rows = dict(self.policy.backbone.work), 0
        for u, rows in enumerate(self._rows(n, seed_of(self.cfg.train.seed, "shuffle", self.steps_done))):
            gen = torch.Generator().manual_seed(seed_of(self.cfg.train.seed, "noise", self.steps_done, self.rank))
            parts = self.algo.step(self, batch, rows, gen, u == 0)
            self.steps_done += 1
            self._update_ema()
            for k, v in parts.items():  # "..._max" statistics are maxima, the others means over the updates
                stats[k] = max(stats.get(k, v), v) if k.endswith("_max") else (
                    stats.get(k, 0.0) + v / self.cfg.train.updates_per_iteration)
        stats["grad_norm"] = self.engine.grad_norm
        if "old" in self.algo.slots:
            stats["old_decay"] = self._update_old()
        stats["step"] = self.steps_done
        # this rank's work (summed over ranks by the group): denoiser rows, and DRaFT's value_and_grad rows
        work = delta(self.policy.backbone.work, before) | ({"value_grad": self.value_rows} if self.value_rows else {})
        return stats | {f"work/{k}": float(v) for k, v in work.items()}

    def _nft_step(self, batch: dict, rows: Tensor, gen: torch.Generator) -> dict:
        """One optimizer step of DiffusionNFT on `rows` (micro-batches x training times, accumulated)."""
        cfg, nft = self.cfg, self.cfg.nft
        _, micro = micro_batches(cfg, self.world_size)
        acc = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "loss_pos": 0.0, "loss_neg": 0.0}
        count = 0
        for idx in rows.split(micro):
            z, tau = batch["z"][idx].float(), batch["tau"][idx].float()
            r, cond = batch["r"][idx].float(), self.cond([batch["prompts"][i] for i in idx.tolist()])
            x0 = None
            if nft.target == "tweedie":  # the old policy's one-step estimate at z_tau (z_tau itself at tau=0)
                with torch.no_grad():
                    todo = (tau > 0).nonzero().flatten()
                    x0 = z.clone().to(self.device)
                    if len(todo):
                        c = type(cond)(cond.tokens[todo.to(self.device)], cond.pooled[todo.to(self.device)])
                        v = self.policy.velocity(z[todo].to(self.device), tau[todo].to(self.device), c, "old")
                        x0[todo] = tweedie_x0(x0[todo], tau[todo].to(self.device), v)
            for _ in range(nft.timesteps_per_sample):
                t = sample_train_times(tau, gen, *nft.t_range)
                eps = torch.randn(z.shape, generator=gen)
                z_t, u = bridge_point(z, tau, t, eps)
                z_t, u, t_d = z_t.to(self.device), u.to(self.device), t.to(self.device)
                with torch.no_grad():
                    v_old = self.policy.velocity(z_t, t_d, cond, "old")
                    v_ref = self.policy.velocity(z_t, t_d, cond, REF) if nft.kl_weight > 0 else v_old
                v = self.engine(z_t, t_d, cond)
                out = nft_loss(v, v_old, v_ref, z_t, t_d, u, r.to(self.device), nft.beta, nft.adv_clip_max,
                               nft.kl_weight, x0)
                self.engine.backward(out.loss)
                self.engine.step()
                for k, x in zip(acc, (out.loss.detach(), out.policy_loss, out.kl, out.positive, out.negative)):
                    acc[k] += float(x)
                count += 1
        return {k: v / count for k, v in acc.items()}

    def _draft_step(self, batch: dict, rows: Tensor) -> dict:
        """One optimizer step of DRaFT-K: K differentiable steps to each sample's stop, then -V + lambda R."""
        cfg = self.cfg
        _, micro = micro_batches(cfg, self.world_size)
        acc, count = {"loss": 0.0, "value": 0.0, "reg": 0.0}, 0
        for idx in rows.split(micro):
            z_stop, reg, tau, prompts = self._draft_forward(batch, idx)
            value, grad = self.value(z_stop.detach().float().cpu(), tau, prompts)
            self.value_rows += len(idx)
            loss = draft_surrogate(z_stop, grad.to(self.device), reg, cfg.draft.reg_weight)
            self.engine.backward(loss)
            self.engine.step()
            reg = reg.detach()
            acc["loss"] += float(-value.float().mean() + cfg.draft.reg_weight * reg.mean())
            acc["value"] += float(value.float().mean())
            acc["reg"] += float(reg.mean())
            count += 1
        return {k: v / count for k, v in acc.items()}

    def _draft_forward(self, batch: dict, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        """Run each sample's last K steps with gradients, grouped by stop step; results in `idx` order."""
        k = self.cfg.draft.k
        stops = batch["stop"][idx]
        prompts = [batch["prompts"][i] for i in idx.tolist()]
        z_out, reg_out = [None] * len(idx), [None] * len(idx)
        for stop in sorted(set(stops.tolist())):
            sel = (stops == stop).nonzero().flatten()
            cond = self.cond([prompts[i] for i in sel.tolist()])
            z0 = batch["z"][idx[sel]].float().to(self.device)
            start = max(stop - k, 0)
            z, reg = truncated_rollout(lambda x, t, c=cond: self.engine(x, t, c),
                                       lambda x, t, c=cond: self.policy.velocity(x, t, c, REF),
                                       z0, self.grid, start, stop, k)
            for j, i in enumerate(sel.tolist()):
                z_out[i], reg_out[i] = z[j], reg[j]
        tau = self.grid[stops].float()
        return torch.stack(z_out), torch.stack(reg_out), tau, prompts

    # -- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of the trained weights after every optimizer step."""
        L.lerp_(self.ema, self.policy.named_trainable(), self.cfg.train.ema_decay)

    @torch.no_grad()
    def _update_old(self) -> float:
        """theta_old <- rho theta_old + (1 - rho) theta, rho = min(rate * step, max); returns rho."""
        rho = old_policy_decay(self.steps_done, self.cfg.nft.old_decay_rate, self.cfg.nft.old_decay_max)
        old = L.adapter_params(self.policy.model, "old") if self.policy.lora else dict(
            self.policy.copies["old"].named_parameters())
        L.lerp_(old, self.policy.named_trainable(), rho)
        return rho

    def weights(self, which: str) -> dict[str, Tensor]:
        """Published weights: "sample" (what rollouts use: NFT's old policy, DRaFT's and GRPO's current), "current", "ema"."""
        if which == "ema":  # over the current state: full finetuning also publishes the buffers the EMA lacks
            return self.policy.state() | {k: v.detach().cpu().clone() for k, v in self.ema.items()}
        slot = self.algo.sample_slot if which == "sample" else L.DEFAULT
        return self.policy.state(slot)

    def base_weights(self) -> dict[str, Tensor]:
        """The frozen base weights (the first, full sync)."""
        return self.policy.base_state()

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything to resume exactly: weights of every slot, EMA, optimizer (this rank), step."""
        tensors, scalars = self.engine.optimizer_state()
        out = {"policy": self.policy.state(), "ema": self.weights("ema"), "optimizer": tensors,
               "optimizer_scalars": scalars, "step": self.steps_done}
        if "old" in self.algo.slots:
            out["old"] = self.policy.state("old")
        return out

    def load_state(self, state: dict) -> None:
        """Inverse of `state` (weights first, then the optimizer, whose fp32 masters must match them)."""
        self.policy.load_state(state["policy"])
        if "old" in state:
            self.policy.load_state(state["old"], "old")
        for k, v in self.ema.items():
            v.copy_(state["ema"][k].to(v.device, v.dtype))
        self.engine.load_optimizer_state(state["optimizer"], state["optimizer_scalars"])
        self.steps_done = int(state["step"])
