"""Inference-time alignment on the tiny world: DPS and FK steering with Tweedie vs StitchVM values.

    python benchmarks/inference_alignment.py [--quick] [--json PATH] [--plot PNG] [--stitch NAME|DIR]

One process, fixed held-out prompts and seeds; every final sample is decoded and scored by the clean reward.

- DPS: the flow baseline (the same SDE sampler, no guidance), Tweedie-DPS and StitchVM-DPS, each swept over a
  grid of guidance scales: final clean reward (the best scale kept), seconds per sample (median over the sweep's
  runs, which all make the same network calls; the flow baseline is timed 3 times), peak memory of one batch.
- FK steering: reward vs compute (wall seconds and counted network evaluations, per prompt) for Tweedie-FKS at
  N in {2, 4, 8, 14}, StitchVM-FKS at (N, M) in {(2,2), (4,2), (4,4), (8,4), (8,6)} and Best-of-N; a PNG of the
  curves; the compute at which StitchVM-FKS reaches Tweedie-FKS N=14's reward. StitchVM-FKS without proposals
  (N, 1) for N in {4, 8} separates what the value's resampling and its proposals each bring.
- Every reward comes with its standard error over prompts (reward_se); prompt k uses seed k for every method, so
  differences between methods are paired and their standard error (dps_ratios.reward_diff_se) is smaller.

JSON: dps[method] = {reward, sec_per_sample, peak_mb, scale} for flow, tweedie, stitchvm; fks[method] = list of {N,
M, reward, wall_s, nfe} for tweedie, stitchvm, bon (and stitchvm_m1, no proposals); fks_match_compute_ratio = wall
seconds of the cheapest StitchVM point at or above Tweedie N=14's reward over Tweedie N=14's (null if none reaches
it); plus the sweeps, process CPU seconds beside every wall-clock figure (robust when other jobs load the machine),
ratios, settings, and per FK point a load-independent compute figure (GFLOP per prompt from the counted evaluations
and each network's FLOPs). --quick (32 DPS / 24 FKS prompts, 10 steps) finishes in about 14 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import bootstrap
import torch

from rlstitch.eval.fidelity import peak_mb
from rlstitch.io import atomic_write_text
from rlstitch.models.device import model_device
from rlstitch.models.registry import BACKBONES, load_backbone, load_codec, load_reward, stitch_dir
from rlstitch.sampling import fk
from rlstitch.sampling.flow import FlowSampler
from rlstitch.sampling.guidance import dps_sample
from rlstitch.stitch import artifact
from rlstitch.tinyworld.evaluate import CFG_SCALE, held_out_prompts
from rlstitch.value.estimators import Tweedie

TWEEDIE_N = (2, 4, 8, 14)
STITCH_NM = ((2, 2), (4, 2), (4, 4), (8, 4), (8, 6))
BON_N = (2, 4, 8, 14)
STITCH_M1_N = (4, 8)  # StitchVM-FKS with resampling only (M = 1)
# Guidance-scale grids per value model: StitchVM's latent gradients are 10-80x smaller than Tweedie's on the tiny
# world (measured), so one shared grid would leave one of them far from its best scale.
FULL = {"dps_prompts": 64, "fks_prompts": 24, "steps": 20, "batch": 8, "resample_every": 4,
        "scales": {"tweedie": (0.03, 0.1, 0.3, 1.0, 3.0), "stitchvm": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)}}
QUICK = {"dps_prompts": 32, "fks_prompts": 24, "steps": 10, "batch": 8, "resample_every": 2,
         "scales": {"tweedie": (0.1, 0.3, 1.0, 3.0), "stitchvm": (1.0, 3.0, 10.0, 30.0, 100.0)}}


def load(stitch: str, device: str):
    """Backbone, codec, clean reward and both value models (the stitch's manifest names the models)."""
    path = stitch_dir(stitch)
    m = artifact.read_manifest(path)
    backbone = load_backbone(m["backbone"]["name"], device=device)
    reward = load_reward(m["reward"]["name"], device=device)
    codec = load_codec(BACKBONES[backbone.name].vae, device=device)
    values = {"tweedie": Tweedie(backbone, codec, reward).eval(), "stitchvm": artifact.load(path, backbone, reward)}
    return backbone, codec, reward, values


def chunks(xs: list, n: int) -> list[list]:
    """Consecutive pieces of at most n."""
    return [xs[k : k + n] for k in range(0, len(xs), n)]


def clean_reward(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The clean reward of decoded images."""
    with torch.no_grad():
        return reward.score(images, prompts).float().cpu()


def standard_error(x: torch.Tensor) -> float | None:
    """Standard error of the mean of x (None for a single value)."""
    return float(x.double().std() / len(x) ** 0.5) if len(x) > 1 else None


def reward_stats(rewards: list[torch.Tensor]) -> dict:
    """Mean clean reward, its standard error over prompts, and the per-prompt rewards (for paired comparisons)."""
    r = torch.cat(rewards).double()
    return {"reward": float(r.mean()), "reward_se": standard_error(r), "per_prompt": [round(float(x), 6) for x in r]}


def paired_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of the mean per-prompt difference a - b (same prompts and seeds)."""
    return standard_error(torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- DPS


RUN_KEYS = ("reward", "reward_se", "per_prompt", "sec_per_sample", "cpu_sec_per_sample", "scale")  # one dps_run


def dps_run(ctx: dict, value_model, scale: float, prompts: list[str]) -> dict:
    """Guided samples of every prompt at one scale: mean clean reward and seconds per sample."""
    rewards, start, cpu = [], time.perf_counter(), time.process_time()
    for ps, ss in zip(chunks(prompts, ctx["batch"]), chunks(list(range(len(prompts))), ctx["batch"])):
        out = dps_sample(ctx["backbone"], ctx["codec"], value_model, ps, scale=scale, sampler=ctx["sampler"],
                         cfg_scale=ctx["cfg_scale"], seeds=ss, latent_hw=ctx["latent_hw"])
        rewards.append(clean_reward(ctx["reward"], out.images, ps))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {**reward_stats(rewards), "sec_per_sample": seconds / len(prompts), "cpu_sec_per_sample": cpu / len(prompts),
            "scale": scale}


def dps_peak(ctx: dict, value_model, scale: float, prompts: list[str]) -> float:
    """Peak memory (MB) of guiding one batch."""
    ps = prompts[: ctx["batch"]]
    return peak_mb(lambda: dps_sample(ctx["backbone"], ctx["codec"], value_model, ps, scale=scale,
                                      sampler=ctx["sampler"], cfg_scale=ctx["cfg_scale"], seeds=range(len(ps)),
                                      latent_hw=ctx["latent_hw"]))


def median_timing(runs: list[dict]) -> dict:
    """Median seconds per sample over runs that did the same network calls (a method's cost does not depend on
    its guidance scale), so one slow run (warm-up, a busy machine) does not decide a ratio."""
    out = {k: statistics.median(r[k] for r in runs) for k in ("sec_per_sample", "cpu_sec_per_sample")}
    return out | {"timed_runs": len(runs)}


def dps_bench(ctx: dict, values: dict, prompts: list[str], scales, flow_repeats: int = 3) -> tuple[dict, dict]:
    """The flow baseline and each value model at its best swept scale (sweeps returned too); seconds per sample are
    medians over the timed runs, each method warmed up on one batch first."""
    res, sweeps = {}, {}
    warm = prompts[: ctx["batch"]]
    dps_run(ctx, None, 0.0, warm)
    flow = [dps_run(ctx, None, 0.0, prompts) for _ in range(flow_repeats)]
    res["flow"] = {**flow[0], **median_timing(flow), "peak_mb": dps_peak(ctx, None, 0.0, prompts)}
    print(f"[dps] flow reward {res['flow']['reward']:.4f}, {res['flow']['sec_per_sample']:.3f} s/sample")
    for name in ("tweedie", "stitchvm"):
        sweeps[name] = []
        try:
            dps_run(ctx, values[name], scales[name][0], warm)  # warm-up, untimed
        except ValueError:
            pass  # the sweep below records the failure
        for s in scales[name]:
            try:
                r = dps_run(ctx, values[name], s, prompts)
            except ValueError as e:  # e.g. a scale so large that the latent diverges (NaN)
                r = dict.fromkeys(RUN_KEYS) | {"scale": s, "error": str(e)}
            sweeps[name].append(r)
            print(f"[dps] {name} scale {s}: reward {r['reward']}, {r['sec_per_sample']} s/sample")
        ok = [r for r in sweeps[name] if r["reward"] is not None]
        if not ok:
            res[name] = dict.fromkeys(RUN_KEYS) | {"peak_mb": None, "timed_runs": 0}  # same keys as a success
            continue
        best = max(ok, key=lambda r: r["reward"])
        keep = ("reward", "reward_se", "per_prompt", "scale")
        peak = dps_peak(ctx, values[name], best["scale"], prompts)
        res[name] = {k: best[k] for k in keep} | median_timing(ok) | {"peak_mb": peak}
    return res, sweeps


# ---------------------------------------------------------------------------------------------------- FKS


def unit_flops(ctx: dict, stitch, prompt: str) -> dict[str, float]:
    """FLOPs of one evaluation (one latent) of each counted network: load-independent compute."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(1, ctx["backbone"].latent_channels, *ctx["latent_hw"], device=model_device(ctx["backbone"]))
    calls = {"denoiser": lambda: ctx["backbone"].velocity(z, 0.5),
             "stitchvm": lambda: stitch.value(z, 0.5, [prompt]),
             "decoder": lambda: ctx["codec"].decode(z),
             "reward": lambda: ctx["reward"].embed_image(ctx["codec"].decode(z))}
    with torch.no_grad():
        stitch.value(z, 0.5, [prompt])  # caches the prompt's text embedding (not a per-latent cost)
    out = {}
    for name, fn in calls.items():
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            fn()
        out[name] = float(fc.get_total_flops())
    out["reward"] -= out["decoder"]  # the reward's own share (its input had to be decoded)
    return out


def fks_run(ctx: dict, prompts: list[str], cfg: fk.FKConfig, value_model=None) -> dict:
    """One FK configuration over every prompt: mean clean reward, wall seconds and evaluations per prompt."""
    counter, rewards = fk.EvalCounter(), []
    value_fn = (lambda z, t, p: value_model.value(z, t, p)) if value_model is not None else None
    cost = fk.value_cost(value_model) if value_model is not None else None
    start, cpu = time.perf_counter(), time.process_time()
    for ps, ss in zip(chunks(prompts, ctx["batch"]), chunks(list(range(len(prompts))), ctx["batch"])):
        out = fk.fk_steer(ctx["backbone"], ctx["codec"], ctx["reward"], ps, cfg, value_fn=value_fn, cost=cost,
                          sampler=ctx["sampler"], cfg_scale=ctx["cfg_scale"], seeds=ss, latent_hw=ctx["latent_hw"],
                          counter=counter)
        rewards.append(out.rewards)  # the clean reward of each prompt's decoded final sample
    n = len(prompts)
    gflop = sum(c * ctx["flops"][k] for k, c in counter.counts.items()) / 1e9 / n
    return {"N": cfg.particles, "M": cfg.proposals, **reward_stats(rewards),
            "wall_s": (time.perf_counter() - start) / n, "cpu_s": (time.process_time() - cpu) / n,
            "nfe": counter.total / n, "gflop": gflop,
            "evals": {k: v / n for k, v in counter.counts.items()}}


def fks_bench(ctx: dict, values: dict, prompts: list[str], resample_every: int, lam: float) -> dict:
    """Tweedie-FKS over N, StitchVM-FKS over (N, M), Best-of-N over N."""
    common = dict(resample_every=resample_every, lam=lam, potential="diff", final_select="reward")
    res = {"tweedie": [], "stitchvm": [], "stitchvm_m1": [], "bon": []}
    for n in TWEEDIE_N:
        res["tweedie"].append(fks_run(ctx, prompts, fk.FKConfig(particles=n, **common), values["tweedie"]))
        print(f"[fks] tweedie {_fmt(res['tweedie'][-1])}")
    for n, m in STITCH_NM:
        res["stitchvm"].append(fks_run(ctx, prompts, fk.FKConfig(particles=n, proposals=m, **common), values["stitchvm"]))
        print(f"[fks] stitchvm {_fmt(res['stitchvm'][-1])}")
    for n in STITCH_M1_N:
        res["stitchvm_m1"].append(fks_run(ctx, prompts, fk.FKConfig(particles=n, **common), values["stitchvm"]))
        print(f"[fks] stitchvm_m1 {_fmt(res['stitchvm_m1'][-1])}")
    for n in BON_N:
        res["bon"].append(fks_run(ctx, prompts, fk.FKConfig(particles=n, resample_every=0)))
        print(f"[fks] bon {_fmt(res['bon'][-1])}")
    return res


def _fmt(p: dict) -> str:
    """One FK point."""
    return f"N={p['N']} M={p['M']}: reward {p['reward']:.4f} +- {p['reward_se'] or 0:.4f}, {p['wall_s']:.2f} s/prompt, {p['nfe']:.0f} evals/prompt"


def interpolate(curve: list[dict], x: float, key: str = "wall_s") -> float:
    """The curve's reward at compute x (piecewise linear in x, flat beyond its ends)."""
    pts = sorted((p[key], p["reward"]) for p in curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return pts[-1][1]


def match_compute_ratio(fks: dict, key: str = "wall_s") -> float | None:
    """Compute (wall seconds by default) of the cheapest StitchVM point at or above Tweedie N=14's reward,
    over Tweedie N=14's."""
    ref = next(p for p in fks["tweedie"] if p["N"] == 14)
    ok = [p for p in fks["stitchvm"] if p["reward"] >= ref["reward"]]
    return min(p[key] for p in ok) / ref[key] if ok else None


def curve_above(fks: dict, key: str) -> list[bool]:
    """Per StitchVM point: at or above the Tweedie curve at the same compute (wall seconds or evaluations)."""
    return [p["reward"] >= interpolate(fks["tweedie"], p[key], key) for p in fks["stitchvm"]]


def plot(fks: dict, path: Path) -> None:
    """Reward vs wall seconds, CPU seconds, network evaluations and GFLOP for the three methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    styles = {"tweedie": ("Tweedie-FKS (N)", "o-"), "stitchvm": ("StitchVM-FKS (N, M)", "s-"),
              "stitchvm_m1": ("StitchVM-FKS (N, 1), no proposals", "x:"), "bon": ("Best-of-N", "^--")}
    keys = ("wall_s", "cpu_s", "nfe", "gflop")
    labels = ("wall seconds per prompt", "process CPU seconds per prompt", "network evaluations per prompt",
              "GFLOP per prompt")
    for ax, key, label in zip(axes, keys, labels):
        for name, (legend, style) in styles.items():
            pts = sorted(fks[name], key=lambda p: p[key])
            ax.errorbar([p[key] for p in pts], [p["reward"] for p in pts], yerr=[p["reward_se"] or 0 for p in pts],
                        fmt=style, capsize=2, label=legend)
            for p in pts:
                ax.annotate(f"{p['N']}" + (f",{p['M']}" if p["M"] > 1 else ""), (p[key], p["reward"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(label)
        ax.set_ylabel("final clean reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("FK steering on the tiny world: reward vs compute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ driver


def run(args) -> dict:
    """Both benchmarks in one run."""
    settings = dict(QUICK if args.quick else FULL)
    if args.prompts:
        settings["dps_prompts"] = settings["fks_prompts"] = args.prompts
    if args.scales:
        grid = tuple(float(s) for s in args.scales.split(","))
        settings["scales"] = {"tweedie": grid, "stitchvm": grid}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    backbone, codec, reward, values = load(args.stitch, device)
    prompts = held_out_prompts(max(settings["dps_prompts"], settings["fks_prompts"]))[0]
    ctx = {"backbone": backbone, "codec": codec, "reward": reward, "batch": settings["batch"], "cfg_scale": args.cfg_scale,
           "latent_hw": tuple(values["stitchvm"].manifest["grid_u"][k] * backbone.patch_size for k in (0, 1)),
           "sampler": FlowSampler(steps=settings["steps"], sde=True, noise_level=2.0)}
    ctx["flops"] = unit_flops(ctx, values["stitchvm"], prompts[0])
    dps, sweeps = dps_bench(ctx, values, prompts[: settings["dps_prompts"]], settings["scales"])
    fks = fks_bench(ctx, values, prompts[: settings["fks_prompts"]], settings["resample_every"], args.lam)
    t, s = dps["tweedie"], dps["stitchvm"]
    ratios = {}
    if t["reward"] is not None and s["reward"] is not None:
        ratios = {"time_tweedie_over_stitchvm": t["sec_per_sample"] / s["sec_per_sample"],
                  "cpu_time_tweedie_over_stitchvm": t["cpu_sec_per_sample"] / s["cpu_sec_per_sample"],
                  # the cost of guidance alone: what each method adds to the unguided sampler
                  "guidance_cpu_overhead_tweedie_over_stitchvm": (t["cpu_sec_per_sample"] - dps["flow"]["cpu_sec_per_sample"])
                  / max(s["cpu_sec_per_sample"] - dps["flow"]["cpu_sec_per_sample"], 1e-9),
                  "peak_mb_stitchvm_over_tweedie": s["peak_mb"] / t["peak_mb"], "reward_stitchvm_minus_tweedie": s["reward"] - t["reward"],
                  "reward_diff_se": paired_se(s["per_prompt"], t["per_prompt"])}
    res = {"dps": dps, "dps_sweep": sweeps, "dps_ratios": ratios, "fks": fks,
           "fks_match_compute_ratio": match_compute_ratio(fks),
           "fks_match_cpu_ratio": match_compute_ratio(fks, "cpu_s"),
           "fks_match_gflop_ratio": match_compute_ratio(fks, "gflop"),
           "fks_stitchvm_above_tweedie": {k: curve_above(fks, k) for k in ("wall_s", "cpu_s", "nfe", "gflop")},
           "unit_gflop": {k: v / 1e9 for k, v in ctx["flops"].items()},
           "settings": {**settings, "scales": {k: list(v) for k, v in settings["scales"].items()}, "quick": args.quick, "stitch": args.stitch,
                        "stitch_i": values["stitchvm"].i, "stitch_j": values["stitchvm"].j, "lam": args.lam,
                        "cfg_scale": args.cfg_scale, "device": device, "threads": torch.get_num_threads(),
                        "fk_proposal_frac": fk.FKConfig().proposal_frac, "seeds": "prompt index k uses seed k"},
           "seconds": time.perf_counter() - t0}
    plot(fks, Path(args.plot))
    return res


def print_table(res: dict) -> None:
    """The figures as text tables."""
    print("\nDPS (best swept scale)      reward  +- se      s/sample  cpu s/sample   peak MB   scale")
    for name, r in res["dps"].items():
        if r["reward"] is None:
            print(f"  {name:<24} (every scale failed)")
            continue
        print(f"  {name:<24} {r['reward']:8.4f} {r['reward_se'] or 0:7.4f} {r['sec_per_sample']:10.3f} {r['cpu_sec_per_sample']:13.3f}"
              f" {r['peak_mb']:9.1f}   {r['scale']}")
    for k, v in res["dps_ratios"].items():
        print(f"  {k}: {v if v is None else round(v, 4)}")
    print("\nFK steering          N   M    reward  +- se   wall s/prompt   evals/prompt   GFLOP/prompt")
    for name in ("tweedie", "stitchvm", "stitchvm_m1", "bon"):
        for p in res["fks"][name]:
            print(f"  {name:<16} {p['N']:3d} {p['M']:3d} {p['reward']:9.4f} {p['reward_se'] or 0:7.4f} {p['wall_s']:14.2f} {p['nfe']:14.0f}"
                  f" {p['gflop']:14.2f}")
    print(f"  fks_match_compute_ratio (wall s): {res['fks_match_compute_ratio']}")
    print(f"  fks_match_cpu_ratio: {res['fks_match_cpu_ratio']}")
    print(f"  fks_match_gflop_ratio: {res['fks_match_gflop_ratio']}")
    for k, v in res["fks_stitchvm_above_tweedie"].items():
        print(f"  StitchVM at/above the Tweedie curve ({k}): {v}")
    print(f"  GFLOP per evaluation: {', '.join(f'{k} {v:.4f}' for k, v in res['unit_gflop'].items())}")
    print(f"total {res['seconds']:.0f} s")


def main(argv=None) -> dict:
    """CLI."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32 DPS / 24 FKS prompts, 10 steps, small scale grids")
    p.add_argument("--json", default="outputs/benchmarks/inference_alignment.json")
    p.add_argument("--plot", default=None, help="PNG of the FK curves (default: beside the JSON)")
    p.add_argument("--stitch", default="tiny-sd3_tiny-clip", help="StitchVM artifact name or folder")
    p.add_argument("--prompts", type=int, default=0, help="override the number of held-out prompts")
    p.add_argument("--scales", default="", help="comma-separated DPS guidance scales for both methods (override)")
    p.add_argument("--lam", type=float, default=10.0, help="FK potential lambda (SPEC default 10)")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="classifier-free guidance (tiny world's evaluation CFG)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    args.plot = args.plot or str(Path(args.json).with_suffix(".png"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = run(args)
    print_table(res)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(res, indent=2))
    print(f"JSON in {args.json}, FK curves in {args.plot}")
    return res


if __name__ == "__main__":
    main()
