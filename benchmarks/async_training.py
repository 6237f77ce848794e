"""Pipelined (async) training on the tiny world: iterations per second and clean reward vs wall time for
train.async_staleness 0, 1 and 2, one run each, same seeds.

    python benchmarks/async_training.py [--quick] [--iterations N] [--every E] [--staleness 0,1,2]
        [--json docs/async_training.json] [--plot docs/async_training.png] [--timeline docs/async_timeline.png]
        [key=value ...]

Every run is recipes/nft_flux.py's tiny default (DiffusionNFT + StitchVM on tiny-flux, 64 rollouts per iteration)
with the rollout worker and the learner given one CPU each, so that they can overlap (2 cores here). Wall time is
the time spent in training iterations (rollouts, scores, learner, weight sync; an evaluation first waits for the
rollouts in flight, and that wait counts); start-up and evaluations are not counted. Clean reward: the tiny CLIP
score of fully denoised samples of the 64 held-out prompts with fixed noise.

JSON: throughput[k] (iterations/s), final_reward[k], time_to_sync_final_ratio[k] (wall time at which staleness k
first reaches the synchronous run's final clean reward, over the synchronous run's wall time; null if never),
train_s[k], curves[k] = [{wall_s, step, clean_reward, clean_reward_se}], timings[k] = median seconds per iteration
blocked on rollouts / scores / learner / sync. --timeline draws the Ray timeline (`ray.timeline()`) of the first
async run: rollout tasks, value tasks and learner updates per process against time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import bootstrap  # noqa: F401  (the repository root on sys.path)

from actors.trainer.state import LedgerRow, read_ledger
from rlstitch.io import atomic_write_text

ROLES = {"RolloutWorker": ("rollout", "tab:blue"), "ValueActor": ("value", "tab:orange"),
         "learner": ("learner", "tab:green")}



def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Wall seconds of the first evaluation at or above target."""
    return next((p["wall_s"] for p in curve if p["clean_reward"] >= target), None)

def run_one(k: int, iterations: int, every: int, out: Path, extra: list[str]) -> dict:
    """One nft_flux run at staleness k; returns its summary plus the per-iteration timings."""
    from nft_flux import main

    args = [f"train.steps={iterations}", f"eval.every={every}", f"out={out / f'staleness{k}'}",
            f"train.async_staleness={k}", "checkpoint.resume=false", "log.wandb=false", "log.progress=false",
            "eval.grid=0", "placement.rollout.num_cpus=1", "placement.learner.num_cpus=1", *extra]
    summary = main(args)
    rows = [json.loads(line) for line in (out / f"staleness{k}" / "metrics.jsonl").read_text().splitlines()]
    keys = ("rollout_s", "score_s", "learn_s", "sync_s")
    summary["timings"] = {key: round(statistics.median(r[f"time/{key}"] for r in rows if f"time/{key}" in r), 3)
                          for key in keys}
    return summary


def summarise(summaries: dict[int, dict]) -> dict:
    """The JSON report from the run summaries (keys are staleness values as strings)."""
    keep = ("wall_s", "step", "clean_reward", "clean_reward_se")
    curves = {str(k): [{f: h[f] for f in keep if f in h} for h in s["history"]] for k, s in summaries.items()}
    sync = curves.get("0")
    report = {"throughput": {str(k): round(s["iterations"] / s["train_s"], 4) for k, s in summaries.items()},
              "final_reward": {k: c[-1]["clean_reward"] for k, c in curves.items()},
              "train_s": {str(k): s["train_s"] for k, s in summaries.items()},
              "timings": {str(k): s["timings"] for k, s in summaries.items()}, "curves": curves}
    ratio = {}
    for k, c in curves.items():
        reach = time_to_reach(c, sync[-1]["clean_reward"]) if sync else None
        ratio[k] = None if reach is None else round(reach / sync[-1]["wall_s"], 4)
    report["time_to_sync_final_ratio"] = ratio
    if "0" in report["throughput"]:
        report["speedup"] = {k: round(v / report["throughput"]["0"], 3) for k, v in report["throughput"].items()}
    return report


def plot(report: dict, png: Path) -> None:
    """Clean reward vs training wall time, one curve per staleness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, c in report["curves"].items():
        label = f"staleness {k}: {report['throughput'][k]:.3f} it/s"
        ax.plot([p["wall_s"] for p in c], [p["clean_reward"] for p in c], "o-", markersize=3, label=label)
    if "0" in report["final_reward"]:
        ax.axhline(report["final_reward"]["0"], color="gray", linestyle="--", linewidth=1, label="sync final")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("clean reward (tiny CLIP, 64 held-out prompts)")
    ax.set_title("DiffusionNFT + StitchVM, tiny-flux: pipelined iterations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def timeline_spans(events: list[dict], ledger: list[LedgerRow], start: float, end: float) -> list[tuple[str, str, float, float]]:
    """(role, process, start s, end s) between start and end (epoch seconds): rollout and value actor tasks from
    `ray.timeline()`'s Chrome trace events, learner updates from the run's ledger (the driver's wait for them: the
    update runs inside Ray Train's one long worker task, which the timeline shows as a single span)."""
    spans = [("learner", "learner", t0 - start, t1 - start) for t0, t1 in (r.learned for r in ledger)
             if start <= t0 and t1 <= end]
    for e in events:
        role = next((r for key, (r, _) in ROLES.items() if str(e.get("cat", "")).startswith(f"task::{key}.")), None)
        if e.get("ph") != "X" or role is None or e["cat"].endswith(".__init__"):
            continue
        t0, t1 = e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6
        if start <= t0 and t1 <= end:
            spans.append((role, str(e["tid"]), t0 - start, t1 - start))
    return spans


def plot_timeline(spans: list[tuple[str, str, float, float]], png: Path, title: str, window: float = 40.0) -> None:
    """One row per process, a bar per task / update, coloured by role; the first `window` seconds after the
    first learner update (the steady state)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = min((s[2] for s in spans if s[0] == "learner"), default=0.0)
    shown = [s for s in spans if first <= s[2] <= first + window]
    rows = sorted({(s[0], s[1]) for s in shown}, key=lambda r: (list(dict(ROLES.values())).index(r[0]), r[1]))
    colors = {role: c for role, c in ROLES.values()}
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.5))
    for y, (role, tid) in enumerate(rows):
        bars = [(s[2] - first, s[3] - s[2]) for s in shown if (s[0], s[1]) == (role, tid)]
        ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colors[role], edgecolors="black", linewidth=0.3)
    names = {row: f"{row[0]} {sum(r[0] == row[0] for r in rows[:k])}" for k, row in enumerate(rows)}
    ax.set_yticks(range(len(rows)), [names[row] for row in rows])
    ax.invert_yaxis()  # rollout workers on top, the learner at the bottom
    ax.set_xlabel("seconds since the first learner update")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    """Run each staleness and write the JSON report, the curves and (optionally) the timeline picture."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 iterations, evaluations every 5 (~10 minutes on 2 cores)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per run (default 50, --quick 20)")
    p.add_argument("--every", type=int, default=None, help="iterations between evaluations (default 10, --quick 5)")
    p.add_argument("--staleness", default="0,1,2", help="comma-separated train.async_staleness values")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--timeline", type=Path, default=None, help="PNG of the Ray timeline of the first async run")
    p.add_argument("--out", type=Path, default=None, help="run folders (default: a temp folder)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    a = p.parse_args(argv)
    iterations = a.iterations or (20 if a.quick else 50)
    every = a.every or (5 if a.quick else 10)
    ks = [int(k) for k in a.staleness.split(",")]
    out = a.out or Path(tempfile.mkdtemp(prefix="async_training_"))
    summaries, spans = {}, None
    for k in ks:
        start = time.time()
        summaries[k] = run_one(k, iterations, every, out, a.overrides)
        print(f"staleness {k}: {summaries[k]['iterations'] / summaries[k]['train_s']:.4f} it/s, clean reward "
              f"{summaries[k]['untrained_clean_reward']:.4f} -> {summaries[k]['final_clean_reward']:.4f} in "
              f"{summaries[k]['train_s']:.0f} s", flush=True)
        if a.timeline and k > 0 and spans is None:
            import ray

            events = ray.timeline()
            atomic_write_text(out / "timeline.json", json.dumps(events))  # Chrome trace: chrome://tracing, Perfetto
            spans = timeline_spans(events, read_ledger(out / f"staleness{k}" / "ledger.jsonl"), start, time.time())
            plot_timeline(spans, a.timeline, f"Ray timeline, train.async_staleness={k} (tiny world, 2 cores)")
    report = summarise(summaries)
    report |= {"iterations": iterations, "every": every, "overrides": a.overrides}
    plot(report, a.plot or (a.json.with_suffix(".png") if a.json else out / "async_training.png"))
    if a.json:
        atomic_write_text(a.json, json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("throughput", "speedup", "final_reward", "time_to_sync_final_ratio",
                                             "train_s", "timings") if k in report}, indent=2))
    return report


if __name__ == "__main__":
    main()
