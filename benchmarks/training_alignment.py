"""Training-time alignment on the tiny world: clean reward against counted compute, several seeds per method.

    python benchmarks/training_alignment.py [--quick] [--seeds 3] [--methods nft,nft_stitch] [--json F] [--png F]
        [--merge] [key=value ...]

Methods (all on tiny-sd3 with the tiny CLIP reward, equal settings otherwise):
  nft            DiffusionNFT, rollouts to t=0, clean reward of the decoded sample
  nft_stitch     DiffusionNFT, rollouts stopped at tau, StitchVM value of z_tau, bridge-anchored loss (the recipe's
                 default learner)
  nft_bridge     the same with nft.target=bridge (x0 target z_t - t u on the bridge)
  nft_tweedie    the same with nft.target=tweedie (the old policy's x0 estimate at z_tau)
  nft_full       the same with nft.full_share=0.25 (a quarter of the groups roll on to t=0 and also train t < tau)
  draft          DRaFT-1, reward gradient through decoder + reward model at t=0
  draft_stitch   DRaFT-1, stop at tau, -V(z_tau) with StitchVM's gradient
  grpo           Flow-GRPO, SDE steps 0-3 recorded, rollouts to t=0, clean reward of the decoded sample
  grpo_stitch    Flow-GRPO, the same SDE steps, rollouts stopped at tau, StitchVM value of z_tau
Every method runs once per seed (train.seed: prompt order, rollout noise, stop draws, LoRA init) and is evaluated
every `every` steps on 256 held-out prompts with the EMA weights (the same prompts and noise for every method).
Compute is the run's counted work (rlstitch/train/cost.py) priced two ways: at SD3.5-M's H200 costs (`gpu_s`, the
cost structure of the model tiny-sd3 stands for) and at the tiny world's own CPU costs (`cpu_s`).

The statistic: the baseline's gain G = (its seed-averaged final clean reward) - untrained; the target at q = 75, 90
is untrained + q% G. Each method's seed-averaged curve (reward and compute averaged over seeds at each evaluation)
is read at the target by linear interpolation between evaluations: X_m(q), the compute (or wall time) at which it
first gets there. compute_ratio[m][q] = X_m(q) / X_baseline(q); its standard error is the bootstrap's over seeds
(both methods' seeds resampled with replacement, the target recomputed each time; `reached` is the share of
resamples that reach it). equal_compute[m] = m's final reward minus the baseline's curve read at m's final compute;
final_diff[m] = m's final reward minus the baseline's at the same step count (SE from both methods' seeds).

JSON: untrained_reward, seeds, curves[method][seed] = [{step, wall_s, gpu_s, cpu_s, clean_reward, clean_reward_se}],
mean_curves[method], final_mean / final_se[method] (over seeds), compute_ratio / compute_ratio_se /
compute_ratio_cpu / compute_ratio_cpu_se / wall_ratio / wall_ratio_se / reached [method][q], equal_compute /
equal_compute_se / final_diff / final_diff_se[method], gpu_s_per_step[method], rank_spearman[method] (mean of diag/rank_spearman).
--merge keeps the other methods of an existing --json file.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import bootstrap

# method -> (recipe, mode, overrides)
METHODS = {
    "nft": ("nft_sd35", "baseline", []),
    "nft_stitch": ("nft_sd35", "stitch", []),
    "nft_bridge": ("nft_sd35", "stitch", ["nft.target=bridge"]),
    "nft_tweedie": ("nft_sd35", "stitch", ["nft.target=tweedie"]),
    "nft_full": ("nft_sd35", "stitch", ["nft.full_share=0.25"]),
    "draft": ("draft_sd35", "baseline", []),
    "draft_stitch": ("draft_sd35", "stitch", []),
    "grpo": ("grpo_sd35", "baseline", []),
    "grpo_stitch": ("grpo_sd35", "stitch", []),
}
BASES = ("nft", "draft", "grpo")
QS = ("75", "90")
# One evaluation for every method, whatever its recipe's default: 256 held-out prompts (SE of the mean ~0.014) and
# the EMA weights (train.ema_decay); the StitchVM arms also log the in-group rank fidelity of V(z_tau).
EVAL = ["eval.use_ema=true", "eval.num_prompts=256"]
DIAG = ["nft.rank_every=5", "nft.rank_groups=2"]
KEEP = ("step", "wall_s", "gpu_s", "cpu_s", "clean_reward", "clean_reward_se")


def base_of(method: str) -> str:
    """The baseline a method is compared with (nft_* -> nft)."""
    return method.split("_")[0]


def run_method(method: str, seed: int, steps: int, every: int, out: Path, extra: list[str]) -> dict:
    """One training run through its recipe's main(); returns the recipe's summary."""
    recipe, mode, overrides = METHODS[method]
    args = [f"mode={mode}", f"train.steps={steps}", f"eval.every={every}", f"train.seed={seed}",
            f"out={out / method / f'seed{seed}'}", "checkpoint.resume=false", "log.wandb=false", "log.progress=false",
            "eval.grid=0", *EVAL, *(DIAG if recipe == "nft_sd35" and mode == "stitch" else []), *overrides, *extra]
    if recipe == "nft_sd35":
        from nft_sd35 import main
    elif recipe == "grpo_sd35":
        from grpo_sd35 import main
    else:
        from draft_sd35 import main
    return main(args)


def rank_mean(out: Path) -> float | None:
    """Mean of diag/rank_spearman over a run's metrics.jsonl (None if it logged none)."""
    f = out / "metrics.jsonl"
    vals = [json.loads(line).get("diag/rank_spearman") for line in f.read_text().splitlines()] if f.is_file() else []
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------------- the statistic


def mean_curve(runs: list[list[dict]]) -> list[dict]:
    """The seed-averaged curve: every field averaged over the runs at each evaluation (cut to the shortest)."""
    n = min(len(r) for r in runs)
    return [{k: sum(r[i][k] for r in runs) / len(runs) for k in KEEP if all(k in r[i] for r in runs)}
            for i in range(n)]


def crossing(curve: list[dict], target: float, x: str) -> float | None:
    """The x at which the curve first reaches `target`, linearly interpolated between evaluations (None: never)."""
    for a, b in zip(curve, curve[1:]):
        if b["clean_reward"] >= target > a["clean_reward"]:
            return a[x] + (b[x] - a[x]) * (target - a["clean_reward"]) / (b["clean_reward"] - a["clean_reward"])
    return curve[0][x] if curve and curve[0]["clean_reward"] >= target else None


def read_at(curve: list[dict], at: float, x: str) -> float:
    """The curve's clean reward at x = at (linear between evaluations, held flat past the ends)."""
    for a, b in zip(curve, curve[1:]):
        if a[x] <= at <= b[x] and b[x] > a[x]:
            return a["clean_reward"] + (b["clean_reward"] - a["clean_reward"]) * (at - a[x]) / (b[x] - a[x])
    return curve[-1]["clean_reward"] if at > curve[-1][x] else curve[0]["clean_reward"]


def ratios(method_runs: list[list[dict]], base_runs: list[list[dict]], x: str) -> dict[str, float | None]:
    """{q: X_method(q) / X_base(q)} on the seed-averaged curves, targets from the baseline's mean gain."""
    m, b = mean_curve(method_runs), mean_curve(base_runs)
    untrained, gain = b[0]["clean_reward"], b[-1]["clean_reward"] - b[0]["clean_reward"]
    out = {}
    for q in QS:
        target = untrained + int(q) / 100 * gain
        xm, xb = crossing(m, target, x), crossing(b, target, x)
        out[q] = None if gain <= 0 or xm is None or not xb else xm / xb
    return out


def equal_compute(method_runs: list[list[dict]], base_runs: list[list[dict]], x: str = "gpu_s") -> float:
    """The method's seed-averaged final reward minus the baseline's curve read at the same compute."""
    m, b = mean_curve(method_runs), mean_curve(base_runs)
    return m[-1]["clean_reward"] - read_at(b, m[-1][x], x)


def bootstrap_se(fn, method_runs: list, base_runs: list, n: int = 2000, seed: int = 0) -> tuple[dict, dict]:
    """(standard error, share of resamples with a value) of fn(method_runs, base_runs) -> {key: value or None},
    resampling each side's seeds with replacement."""
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        mr = [rng.choice(method_runs) for _ in method_runs]
        br = [rng.choice(base_runs) for _ in base_runs]
        for k, v in fn(mr, br).items():
            draws.setdefault(k, []).append(v)
    se, reached = {}, {}
    for k, vals in draws.items():
        ok = [v for v in vals if v is not None]
        mu = sum(ok) / len(ok) if ok else 0.0
        se[k] = (sum((v - mu) ** 2 for v in ok) / (len(ok) - 1)) ** 0.5 if len(ok) > 1 else None
        reached[k] = len(ok) / len(vals)
    return se, reached


def _r(v, nd=4):
    """Round a float (None stays None)."""
    return None if v is None else round(v, nd)


def summarise(curves: dict[str, dict[str, list[dict]]], rank: dict | None = None) -> dict:
    """The JSON report from {method: {seed: curve}}."""
    report = {"seeds": {m: sorted(c) for m, c in curves.items()}, "curves": curves, "mean_curves": {},
              "final_mean": {}, "final_se": {}, "gpu_s_per_step": {}, "rank_spearman": dict(rank or {})}
    for key in ("compute_ratio", "compute_ratio_se", "compute_ratio_cpu", "compute_ratio_cpu_se", "wall_ratio",
                "wall_ratio_se", "reached", "equal_compute", "equal_compute_se", "final_diff", "final_diff_se"):
        report[key] = {}
    for m, by_seed in curves.items():
        runs = list(by_seed.values())
        finals = [r[-1]["clean_reward"] for r in runs]
        mu = sum(finals) / len(finals)
        report["final_mean"][m] = _r(mu)
        report["final_se"][m] = _r((sum((f - mu) ** 2 for f in finals) / (len(finals) - 1) / len(finals)) ** 0.5
                                   if len(finals) > 1 else None)
        mc = mean_curve(runs)
        report["mean_curves"][m] = [{k: _r(v) for k, v in p.items()} for p in mc]
        report["gpu_s_per_step"][m] = _r(mc[-1]["gpu_s"] / mc[-1]["step"]) if mc[-1].get("step") else None
        base = base_of(m)
        if base not in curves:
            continue
        bruns = list(curves[base].values())
        for key, x in (("compute_ratio", "gpu_s"), ("compute_ratio_cpu", "cpu_s"), ("wall_ratio", "wall_s")):
            report[key][m] = {q: _r(v) for q, v in ratios(runs, bruns, x).items()}
            se, reached = bootstrap_se(lambda a, b, x=x: ratios(a, b, x), runs, bruns)
            report[f"{key}_se"][m] = {q: _r(v) for q, v in se.items()}
            if key == "compute_ratio":
                report["reached"][m] = {q: _r(v, 3) for q, v in reached.items()}
        b_final = [r[-1]["clean_reward"] for r in bruns]
        b_mu = sum(b_final) / len(b_final)
        report["final_diff"][m] = _r(mu - b_mu)
        report["final_diff_se"][m] = _r((sum((f - mu) ** 2 for f in finals) / max(len(finals) - 1, 1) / len(finals)
                                         + sum((f - b_mu) ** 2 for f in b_final) / max(len(b_final) - 1, 1)
                                         / len(b_final)) ** 0.5)
        report["equal_compute"][m] = _r(equal_compute(runs, bruns))
        se, _ = bootstrap_se(lambda a, b: {"d": equal_compute(a, b)}, runs, bruns)
        report["equal_compute_se"][m] = _r(se["d"])
    first = next(iter(curves.values()))
    report["untrained_reward"] = _r(next(iter(first.values()))[0]["clean_reward"])
    return report


def plot(report: dict, png: Path) -> None:
    """Clean reward vs projected GPU-hours (SD3.5-M on an H200), seed-mean with a +-1 SE band, per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = [b for b in BASES if any(base_of(m) == b for m in report["curves"])]
    fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4.2), sharey=True, squeeze=False)
    for ax, base in zip(axes[0], bases):
        for m in [m for m in report["curves"] if base_of(m) == base]:
            runs = list(report["curves"][m].values())
            mc = mean_curve(runs)
            n = len(mc)
            xs = [p["gpu_s"] / 3600 for p in mc]
            ys = [p["clean_reward"] for p in mc]
            se = [(sum((r[i]["clean_reward"] - ys[i]) ** 2 for r in runs) / max(len(runs) - 1, 1) / len(runs)) ** 0.5
                  for i in range(n)]
            (line,) = ax.plot(xs, ys, "o-" if m == base else "s-", markersize=3, label=f"{m} ({len(runs)} seeds)")
            ax.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)],
                            color=line.get_color(), alpha=0.2)
        ax.axhline(report["untrained_reward"], color="gray", linestyle="--", linewidth=1, label="untrained")
        r = report["compute_ratio"].get(f"{base}_stitch", {}).get("90")
        ax.set_title(f"{base.upper()}: StitchVM at 90% of the gain: {r if r is not None else '-'} x compute")
        ax.set_xlabel("projected GPU-hours (SD3.5-M cost per op, H200)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("clean reward (tiny CLIP, 256 held-out prompts)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def table(report: dict) -> str:
    """The report as a text table."""
    lines = [f"{'method':<14}{'final':>16}{'GPU-s/step':>11}{'compute@75':>18}{'compute@90':>18}{'wall@90':>16}"
             f"{'equal compute':>20}{'final - base':>20}{'rank rho':>10}"]
    for m in report["curves"]:
        def cell(key, q, m=m):
            v, se = report[key].get(m, {}).get(q), report[f"{key}_se"].get(m, {}).get(q)
            return "-" if v is None else f"{v:.3f}" + (f" +-{se:.3f}" if se is not None else "")
        ec, ecs = report["equal_compute"].get(m), report["equal_compute_se"].get(m)
        rho = report["rank_spearman"].get(m)
        fd, fds = report["final_diff"].get(m), report["final_diff_se"].get(m)
        lines.append(f"{m:<14}{report['final_mean'][m]:>8.4f} +-{report['final_se'][m] or 0:.4f}"
                     f"{report['gpu_s_per_step'][m] or 0:>11.2f}{cell('compute_ratio', '75'):>18}"
                     f"{cell('compute_ratio', '90'):>18}{cell('wall_ratio', '90'):>16}"
                     f"{'-' if ec is None else f'{ec:+.4f} +-{ecs or 0:.4f}':>20}"
                     f"{'-' if fd is None else f'{fd:+.4f} +-{fds or 0:.4f}':>20}{'-' if rho is None else f'{rho:.3f}':>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run every method for every seed; write the JSON report and the PNG; print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="20 steps per run instead of 60 (evaluations still every 5 steps on 256 prompts)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="run folders (default: a temp folder)")
    p.add_argument("--methods", default="nft,nft_stitch,draft,draft_stitch,grpo,grpo_stitch")
    p.add_argument("--merge", action="store_true", help="keep the other methods of an existing --json file")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or a.seeds < 1:
        p.error(f"unknown methods {unknown} (known: {list(METHODS)}) or --seeds < 1")
    steps, every = (20, 5) if a.quick else (60, 5)
    out = a.out or Path(tempfile.mkdtemp(prefix="training_alignment_"))
    previous = json.loads(a.json.read_text()) if a.merge and a.json and a.json.is_file() else {}
    curves = {m: c for m, c in previous.get("curves", {}).items() if m not in methods}
    rank = {m: r for m, r in previous.get("rank_spearman", {}).items() if m not in methods}
    for m in methods:
        curves[m] = {}
        for seed in range(a.seeds):
            s = run_method(m, seed, steps, every, out, a.overrides)
            curves[m][str(seed)] = [{k: h[k] for k in KEEP if k in h} for h in s["history"]]
            print(f"{m} seed {seed}: {s['untrained_clean_reward']:.4f} -> {s['final_clean_reward']:.4f}, "
                  f"{s['cost'].get('gpu_s', 0):.1f} projected GPU-s, {s['train_s']:.0f} s", flush=True)
        vals = [rank_mean(out / m / f"seed{seed}") for seed in range(a.seeds)]
        if any(v is not None for v in vals):
            rank[m] = round(sum(v for v in vals if v is not None) / sum(v is not None for v in vals), 4)
    report = summarise(curves, rank) | {"steps": steps, "every": every}
    png = a.png or (a.json.with_suffix(".png") if a.json else out / "training_alignment.png")
    plot(report, png)
    report["png"] = str(png)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
