"""Training-time alignment on the tiny world: clean reward vs wall-clock for six methods, one run, fixed seeds.

    python benchmarks/training_alignment.py [--quick] [--json /tmp/train.json] [--png /tmp/train.png]
        [--methods grpo,grpo_stitch --merge]

Methods (all on tiny-sd3 with the tiny CLIP reward, equal settings otherwise):
  nft           DiffusionNFT, rollouts to t=0, clean reward of the decoded sample
  nft_stitch    DiffusionNFT, rollouts stopped at tau, StitchVM value of z_tau, bridge-anchored loss
  draft         DRaFT-1, reward gradient through decoder + reward model at t=0
  draft_stitch  DRaFT-1, stop at tau, -V(z_tau) with StitchVM's gradient
  grpo          Flow-GRPO, SDE steps 0-3 recorded, rollouts to t=0, clean reward of the decoded sample
  grpo_stitch   Flow-GRPO, the same SDE steps, rollouts stopped at tau, StitchVM value of z_tau
Wall time is the time spent in training iterations (rollouts, scoring, learner, weight sync); start-up and
evaluations are not counted. The clean reward is the tiny CLIP score of fully denoised samples of held-out
prompts with fixed noise (independent of the training signal).

JSON: untrained_reward (and untrained_se); curves[method] = [{wall_s, step, clean_reward, clean_reward_se}];
final[method], final_se[method] (standard error over the held-out prompts); above_untrained_se[method] = the gain
final - untrained in standard errors of the difference (paired over the prompts: curves keep per-prompt scores); time_to_baseline_ratio = {nft, draft,
grpo}: the wall time at which the StitchVM variant first reaches the baseline's final clean reward, over the
baseline's total wall time (null if never). --merge keeps the other methods' curves of an existing --json file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import bootstrap

METHODS = {
    "nft": ("nft_sd35", "baseline"),
    "nft_stitch": ("nft_sd35", "stitch"),
    "draft": ("draft_sd35", "baseline"),
    "draft_stitch": ("draft_sd35", "stitch"),
    "grpo": ("grpo_sd35", "baseline"),
    "grpo_stitch": ("grpo_sd35", "stitch"),
}
BASES = ("nft", "draft", "grpo")
# One evaluation for every method, whatever its recipe's default: 256 held-out prompts (SE of the mean ~0.014,
# against ~0.03 with 64, which is as large as the gains being compared) and the EMA weights (train.ema_decay).
EVAL = ["eval.use_ema=true", "eval.num_prompts=256"]


def run_method(method: str, steps: int, every: int, out: Path, extra: list[str]) -> dict:
    """One training run through its recipe's main(); returns the recipe's summary."""
    recipe, mode = METHODS[method]
    args = [f"mode={mode}", f"train.steps={steps}", f"eval.every={every}", f"out={out / method}",
            "checkpoint.resume=false", "log.wandb=false", "log.progress=false", "eval.grid=0", *EVAL, *extra]
    if recipe == "nft_sd35":
        from nft_sd35 import main
    elif recipe == "grpo_sd35":
        from grpo_sd35 import main
    else:
        from draft_sd35 import main
    return main(args)


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Wall seconds of the first evaluation at or above target."""
    return next((p["wall_s"] for p in curve if p["clean_reward"] >= target), None)


def gain_in_se(before: dict, after: dict) -> float | None:
    """(after - before) clean reward in standard errors of the difference: paired over the held-out prompts when
    both evaluations kept per-prompt scores (same prompts and noise), else from the two means' SEs."""
    a, b = before.get("clean_per_prompt"), after.get("clean_per_prompt")
    if a and b and len(a) == len(b) > 1:
        d = [y - x for x, y in zip(a, b)]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    elif before.get("clean_reward_se") is not None and after.get("clean_reward_se") is not None:
        mean = after["clean_reward"] - before["clean_reward"]
        se = (after["clean_reward_se"] ** 2 + before["clean_reward_se"] ** 2) ** 0.5
    else:
        return None
    return round(mean / max(se, 1e-12), 2)


def summarise(summaries: dict[str, dict], previous: dict | None = None) -> dict:
    """The JSON report from the run summaries (plus the other methods' curves of a previous report)."""
    keep = ("wall_s", "step", "clean_reward", "clean_reward_se", "clean_per_prompt")
    curves = {m: c for m, c in (previous or {}).get("curves", {}).items() if m not in summaries}
    curves |= {m: [{k: h[k] for k in keep if k in h} for h in s["history"]] for m, s in summaries.items()}
    train_s = {m: t for m, t in (previous or {}).get("train_s", {}).items() if m not in summaries}
    train_s |= {m: s["train_s"] for m, s in summaries.items()}
    final = {m: c[-1]["clean_reward"] for m, c in curves.items()}
    final_se = {m: c[-1].get("clean_reward_se") for m, c in curves.items()}
    ratio = {}
    for base in BASES:
        if base in curves and f"{base}_stitch" in curves:
            reach = time_to_reach(curves[f"{base}_stitch"], final[base])
            total = curves[base][-1]["wall_s"]
            ratio[base] = None if reach is None or total <= 0 else round(reach / total, 4)
    # every method's first point is the same untrained model on the same prompts; prefer one that has its SE
    first = next((c[0] for c in curves.values() if "clean_reward_se" in c[0]), next(iter(curves.values()))[0])
    untrained, untrained_se = first["clean_reward"], first.get("clean_reward_se")
    above = {m: gain_in_se(c[0], c[-1]) for m, c in curves.items()}
    return {"untrained_reward": untrained, "untrained_se": untrained_se, "curves": curves, "final": final,
            "final_se": final_se, "above_untrained_se": above, "time_to_baseline_ratio": ratio, "train_s": train_s}


def plot(report: dict, png: Path) -> None:
    """Clean reward vs training wall time, one panel per algorithm (baseline and StitchVM variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BASES), figsize=(5 * len(BASES), 4), sharey=True)
    for ax, base in zip(axes, BASES):
        for m, style in ((base, "o-"), (f"{base}_stitch", "s-")):
            c = report["curves"].get(m)
            if c:
                ax.plot([p["wall_s"] for p in c], [p["clean_reward"] for p in c], style, label=m, markersize=3)
        ax.axhline(report["untrained_reward"], color="gray", linestyle="--", linewidth=1, label="untrained")
        r = report["time_to_baseline_ratio"].get(base)
        ax.set_title(f"{base.upper()}: StitchVM reaches baseline at {r if r is not None else '-'} x its time")
        ax.set_xlabel("training wall time (s)")
        ax.legend()
    axes[0].set_ylabel("clean reward (tiny CLIP, held-out prompts)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    """Run the four methods and write the JSON report and the PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (20 steps per method, ~15 minutes on 2 cores)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="run folders (default: a temp folder)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--merge", action="store_true", help="keep the other methods' curves of an existing --json file")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    a = p.parse_args(argv)
    steps, every = (20, 5) if a.quick else (60, 10)
    out = a.out or Path(tempfile.mkdtemp(prefix="training_alignment_"))
    summaries = {}
    for m in a.methods.split(","):
        summaries[m] = run_method(m, steps, every, out, a.overrides)
        print(f"{m}: untrained {summaries[m]['untrained_clean_reward']:.4f} -> final "
              f"{summaries[m]['final_clean_reward']:.4f} in {summaries[m]['train_s']:.0f} s", flush=True)
    previous = json.loads(a.json.read_text()) if a.merge and a.json and a.json.is_file() else None
    report = summarise(summaries, previous)
    png = a.png or (a.json.with_suffix(".png") if a.json else out / "training_alignment.png")
    plot(report, png)
    report["png"] = str(png)
    text = json.dumps(report, indent=2)
    if a.json:
        a.json.write_text(text)
    print(json.dumps({k: report[k] for k in ("untrained_reward", "untrained_se", "final", "final_se",
                                             "above_untrained_se", "time_to_baseline_ratio", "train_s")},
                     indent=2))
    return report


if __name__ == "__main__":
    main()
