"""Flow-GRPO rollout/train consistency, Ray-free: max |logp_learner - logp_sampler| at the first update.

    python benchmarks/grpo_logp.py [--device cuda|cpu] [--dtypes bfloat16,float32] [--json out.json]

Loads the tiny-world backbone (tiny-sd3, random text conditions: no text encoder needed) with a perturbed LoRA
adapter, samples Flow-GRPO rollouts (SDE steps recorded in a window, velocities in chunks of the micro-batch
size, as the rollout workers), then recomputes every recorded step's log-probability as the learner does
(autograd on, micro-batches of shuffled (sample, step) pairs) in two ways: padded to the sampler's chunk size
(what the learner does) and unpadded with a different batch size (what a learner that ignores the batch size
would do). Prints JSON: per dtype, max |delta logp| and max |1 - ratio| for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bootstrap
import torch

from rlstitch.models.condition import Condition
from rlstitch.models.registry import load_backbone
from rlstitch.sampling.flow import FlowSampler
from rlstitch.train import lora as L
from rlstitch.train.grpo import padded_chunks
from rlstitch.train.grpo_rollout import recorded_logprob, sample_recorded
from rlstitch.train.policy import Policy


def setup(device: str, dtype: torch.dtype, n: int):
    """The policy (tiny-sd3 + a perturbed rank-32 adapter) and n random text conditions, all seeded."""
    backbone = load_backbone("tiny-sd3", dtype=dtype, device=device, with_text=False)
    policy = Policy(backbone, True, 32, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in L.adapter_params(policy.model).values():
            p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    cfg = backbone.model.config
    cond = Condition(torch.randn(n, 12, cfg.joint_attention_dim, generator=g),
                     torch.randn(n, cfg.pooled_projection_dim, generator=g)).to(device, dtype)
    return policy, cond


def recompute(policy, cond, rec: dict, grid, micro: int, pad: bool, variant: str, device: str) -> torch.Tensor:
    """Learner-side log-probabilities of every recorded step, shuffled pairs in micro-batches (padded or not)."""
    n, w = rec["logp"].shape
    order = torch.randperm(n * w, generator=torch.Generator().manual_seed(1))
    out = torch.empty(n * w)
    if pad:
        chunks = [(order[idx], real) for idx, real in padded_chunks(len(order), micro)]
    else:
        chunks = [(c, len(c)) for c in order.split(micro)]
    for pairs, real in chunks:
        i, j = pairs // w, pairs % w
        z = rec["z_prev"][i, j].to(device)
        t = grid[rec["steps"][i, j]].float().to(device)
        c = Condition(cond.tokens[i.to(device)], cond.pooled[i.to(device)])
        with torch.enable_grad():
            v = policy.velocity(z, t, c)
        lp, _, _ = recorded_logprob(v, z, rec["z_next"][i, j], rec["steps"][i, j], grid, variant, 0.7)
        out[pairs[:real]] = lp[:real].detach().float().cpu()
    return out.view(n, w)


def measure(device: str, dtype: torch.dtype, n: int, micro: int, variant: str) -> dict:
    """Sample, recompute (padded and unpadded), and compare."""
    policy, cond = setup(device, dtype, n)
    grid = FlowSampler(10).timesteps()
    z1 = torch.randn(n, policy.backbone.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)
    gens = [torch.Generator().manual_seed(100 + k) for k in range(n)]

    def velocity(z, t, rows):
        return policy.velocity(z, t.to(device), Condition(cond.tokens[rows.to(device)], cond.pooled[rows.to(device)]))

    with torch.no_grad():
        rec = sample_recorded(velocity, z1, grid, [5] * n, (0, 4), micro, gens, variant)
    result = {}
    for name, pad, size in (("padded", True, micro), ("unpadded", False, 3)):
        delta = recompute(policy, cond, rec, grid, size, pad, variant, device) - rec["logp"]
        result[name] = {"micro_batch": size, "max_abs_delta_logp": float(delta.abs().max()),
                        "max_abs_1_minus_ratio": float((1 - delta.double().exp()).abs().max())}
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement for each dtype and print (and optionally write) JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--variant", default="sde", choices=("sde", "cps"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu")
    report = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
              "samples": a.samples, "recorded_steps": 4, "variant": a.variant}
    for name in a.dtypes.split(","):
        report[name] = measure(a.device, getattr(torch, name), a.samples, a.micro, a.variant)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)
    return report


if __name__ == "__main__":
    main()
