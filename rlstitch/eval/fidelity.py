"""Noisy-latent fidelity benchmark (the paper's Table 5 on the tiny world) and the cost of one value call.

    python -m rlstitch.eval.fidelity --stitch DIR --json PATH --plot PNG [--device auto|cpu|cuda]

DIR is a `python -m rlstitch.stitch.build ... baselines=true` output: the finetuned StitchVM, with
closed_form/, vae_stitch/ and noisy_reward/ inside. For every t in {0.1, 0.25, 0.5, 0.75, 0.9} it reports
image->text and text->image Recall@1 (CLIP-type rewards; SRCC with the labels for the aesthetic reward)
of clean, tweedie, vae_stitch, noisy_reward, stitchvm_cf and stitchvm, the mean cosine of each estimate's
embedding to the clean image's (`cos_to_clean`), plus value / value_and_grad cost at batch 16 for stitchvm vs
tweedie, all in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from rlstitch.data import scenes as data
from rlstitch.eval.metrics import recall_at_1, spearman, unique_captions
from rlstitch.io import atomic_write, atomic_write_text
from rlstitch.models.device import model_device
from rlstitch.models.registry import (
    BACKBONES,
    DEVICES,
    load_backbone,
    load_codec,
    load_reward,
    resolve_device,
)
from rlstitch.sampling.flow import forward_noise
from rlstitch.stitch import artifact
from rlstitch.stitch.noisy import NoisyReward
from rlstitch.stitch.vm import LatentTokens
from rlstitch.value.estimators import Tweedie

TIMES = ("0.1", "0.25", "0.5", "0.75", "0.9")
METHODS = ("clean", "tweedie", "vae_stitch", "noisy_reward", "stitchvm_cf", "stitchvm")
COST_REPEATS = 21  # interleaved timing rounds (medians) for the value / value_and_grad cost


def load_methods(stitch: Path, device: torch.device | str = "cpu") -> tuple[dict, object, object, object]:
    """Every value estimator of the benchmark, from one stitch build folder, on one device."""
    manifest = artifact.read_manifest(stitch)
    backbone = load_backbone(manifest["backbone"]["name"], device=device)
    reward = load_reward(manifest["reward"]["name"], device=device)
    codec = load_codec(BACKBONES[backbone.name].vae, device=device)
    ident = LatentTokens(backbone.latent_channels, name=f"latent:{backbone.name}")
    baselines = {  # method -> (sub-folder of a baselines=true build, loader)
        "vae_stitch": ("vae_stitch", lambda d: artifact.load(d, ident, reward)),
        "noisy_reward": ("noisy_reward", lambda d: NoisyReward.load(d, reward)),
        "stitchvm_cf": ("closed_form", lambda d: artifact.load(d, backbone, reward)),
    }
    methods = {"tweedie": Tweedie(backbone, codec, reward).eval()}
    for name, (folder, load) in baselines.items():
        if (stitch / folder).is_dir():
            methods[name] = load(stitch / folder)
        else:  # e.g. a recipes/build_stitch.py artifact: report what is there
            print(f"{stitch / folder} not found: {name} is left out (build with baselines=true to include it)")
    methods["stitchvm"] = artifact.load(stitch, backbone, reward)
    return methods, backbone, reward, codec


@torch.no_grad()
def embeddings(method, z0: torch.Tensor, t: float, seed: int, chunk: int = 125) -> torch.Tensor:
    """Embeddings of z_t = (1-t) z0 + t eps with fixed noise (drawn on the CPU: the same z_t on any device)."""
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
    zt = forward_noise(z0, t, eps)
    return torch.cat([method.embed(zt[k : k + chunk], torch.full((len(zt[k : k + chunk]),), t, device=z0.device))
                      for k in range(0, len(zt), chunk)])


def fidelity_table(methods: dict, reward, codec, n: int) -> dict:
    """R@1 (or SRCC) per method and t on n held-out pairs."""
    b = data.batch(range(n), "val")
    images = data.to_tensor(b["images"]).to(model_device(reward))
    with torch.no_grad():
        z0 = torch.cat([codec.encode(images[k : k + 250]) for k in range(0, n, 250)])
        clean = torch.cat([reward.embed_image(images[k : k + 250]) for k in range(0, n, 250)])
    aesthetic = reward.kind == "aesthetic"
    gallery = unique_captions(b["captions"])
    txt = None if aesthetic else reward.embed_text(gallery)

    def score(emb):
        if aesthetic:
            return {"srcc": spearman(reward.score_embedding(emb, None).tolist(), b["aesthetic"].tolist())}
        r = recall_at_1(emb, b["captions"], txt, gallery)
        return {"r1_i2t": r["i2t"], "r1_t2i": r["t2i"]}

    keys = ("srcc",) if aesthetic else ("r1_i2t", "r1_t2i")
    out = {k: {m: {} for m in METHODS if m == "clean" or m in methods} for k in keys}
    base = score(clean)
    for k in keys:
        out[k]["clean"] = {t: base[k] for t in TIMES}
    out["cos_to_clean"] = {m: {} for m in methods}
    for name, method in methods.items():
        for t in TIMES:
            emb = embeddings(method, z0, float(t), seed=int(float(t) * 1000))
            res = score(emb)
            for k in keys:
                out[k][name][t] = res[k]
            # how close the estimate's embedding is to the clean reward's: separates fit quality from metric noise
            out["cos_to_clean"][name][t] = F.cosine_similarity(emb.float(), clean.float(), dim=-1).mean().item()
    out["gallery_size"] = n
    out["gallery_captions"] = len(gallery)
    return out


def peak_mb(fn) -> float:
    """Memory fn allocates above what was resident before it: on GPU the device peak minus the allocation before
    the call; on CPU the peak of torch's own allocations during the call (profiler)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak / 2**20


def median_ms(fn, repeats: int = 7) -> float:
    """Median wall ms of fn over `repeats` calls after one warm-up (CUDA-synchronised when a GPU is present)."""
    return interleaved_ms({"fn": fn}, repeats)["fn"]


def interleaved_ms(fns: dict, repeats: int = 7) -> dict:
    """Median wall ms of each fn over `repeats` rounds that call every fn once in turn, after one warm-up each:
    a slow spell of a shared machine then falls on all of them alike, and their ratios hold."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        fn()
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            s = time.perf_counter()
            fn()
            sync()
            times[k].append(1000 * (time.perf_counter() - s))
    return {k: statistics.median(v) for k, v in times.items()}


def cost(method, z: torch.Tensor, prompts: list[str], repeats: int = 7) -> dict:
    """Median ms of value and value_and_grad at this batch, and the memory value_and_grad allocates."""
    return costs({"method": method}, z, prompts, repeats)["method"]


def costs(methods: dict, z: torch.Tensor, prompts: list[str], repeats: int = 7) -> dict:
    """`cost` of several methods, timed in interleaved rounds so that their ratios are fair on a busy machine."""
    t = torch.full((len(z),), 0.5, device=z.device)
    with torch.no_grad():
        value = interleaved_ms({k: (lambda m=m: m.value(z, t, prompts)) for k, m in methods.items()}, repeats)
    grad = interleaved_ms({k: (lambda m=m: m.value_and_grad(z, t, prompts)) for k, m in methods.items()}, repeats)
    return {k: {"value_ms": value[k], "grad_ms": grad[k], "grad_peak_mb": peak_mb(lambda m=m: m.value_and_grad(z, t, prompts))}
            for k, m in methods.items()}


def plot(res: dict, path: Path) -> None:
    """R@1 (or SRCC) against t for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "srcc" if "srcc" in res else "r1_i2t"
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [float(t) for t in TIMES]
    for m in [m for m in METHODS if m in res[key]]:
        style = "--" if m == "clean" else "-o"
        ax.plot(ts, [res[key][m][t] for t in TIMES], style, label=m)
    ax.set_xlabel("t (noise level)")
    ax.set_ylabel("SRCC" if key == "srcc" else "image->text Recall@1")
    ax.set_title(f"Noisy-latent fidelity ({res['gallery_size']} held-out pairs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:  # a failed write leaves no half-written PNG, and the figure is freed either way
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), ".png")
    finally:
        plt.close(fig)


def run(stitch: Path, n: int = 500, device: str = "auto") -> dict:
    """The whole benchmark."""
    t0 = time.time()
    dev = resolve_device(device, "--device")
    methods, backbone, reward, codec = load_methods(stitch, dev)
    res = fidelity_table(methods, reward, codec, n)
    b = data.batch(range(16), "test")
    with torch.no_grad():
        z = codec.encode(data.to_tensor(b["images"]).to(dev))
    prompts = list(b["captions"])
    res["cost"] = costs({m: methods[m] for m in ("stitchvm", "tweedie")}, z, prompts, repeats=COST_REPEATS)
    res["cost"]["batch"] = 16
    res["cost"]["repeats"] = COST_REPEATS
    res["cost"]["speedup_grad"] = res["cost"]["tweedie"]["grad_ms"] / res["cost"]["stitchvm"]["grad_ms"]
    res["cost"]["memory_ratio_grad"] = res["cost"]["stitchvm"]["grad_peak_mb"] / res["cost"]["tweedie"]["grad_peak_mb"]
    res["stitch"] = {"i": methods["stitchvm"].i, "j": methods["stitchvm"].j, "backbone": backbone.name,
                     "reward": reward.name}
    res["device"] = str(dev)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def print_table(res: dict) -> None:
    """The figures as a text table."""
    for key in [k for k in ("r1_i2t", "r1_t2i", "srcc") if k in res]:
        print(f"\n{key} ({res['gallery_size']} pairs)")
        print("method        " + "".join(f"{t:>8s}" for t in TIMES))
        for m in [m for m in METHODS if m in res[key]]:
            print(f"{m:14s}" + "".join(f"{res[key][m][t]:8.3f}" for t in TIMES))
    print("\nmean cosine to the clean image embedding")
    for m, row in res["cos_to_clean"].items():
        print(f"{m:14s}" + "".join(f"{row[t]:8.3f}" for t in TIMES))
    c = res["cost"]
    print(f"\ncost at batch {c['batch']}: value ms stitchvm {c['stitchvm']['value_ms']:.1f} vs tweedie "
          f"{c['tweedie']['value_ms']:.1f}; value_and_grad ms {c['stitchvm']['grad_ms']:.1f} vs "
          f"{c['tweedie']['grad_ms']:.1f} ({c['speedup_grad']:.2f}x faster); peak MB {c['stitchvm']['grad_peak_mb']:.1f} "
          f"vs {c['tweedie']['grad_peak_mb']:.1f} ({c['memory_ratio_grad']:.2f}x)")


def main(argv=None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description="Noisy-latent fidelity of a StitchVM and its baselines")
    p.add_argument("--stitch", required=True, help="a stitch build folder (with baselines)")
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default=None, help="PNG (default: beside the JSON)")
    p.add_argument("--gallery", type=int, default=500, help="held-out image/caption pairs")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when this process sees a GPU")
    a = p.parse_args(argv)
    res = run(Path(a.stitch), a.gallery, a.device)
    atomic_write_text(a.json, json.dumps(res, indent=2))
    plot(res, Path(a.plot) if a.plot else Path(a.json).with_suffix(".png"))
    print_table(res)


if __name__ == "__main__":
    main()
