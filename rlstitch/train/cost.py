"""Compute accounting: the work a training run does, counted in operations, and its cost from a committed table.

Work is a dict {op: rows}, one row = one sample through one operation:

    denoiser_fwd       full forwards of the diffusion transformer (rollouts, learner, old/ref policies)
    denoiser_bwd       backwards through it (rows whose forward ran with gradients)
    decode             VAE decodes (clean rewards)
    reward             reward-model forwards on decoded images
    decode_reward_bwd  backward through decoder + reward model (DRaFT's baseline gradient)
    value_fwd/i=I      StitchVM forwards with a DiT cut at block I (prefix i blocks + stitch + reward tail)
    value_bwd/i=I      StitchVM backwards (DRaFT + StitchVM)

`rlstitch/train/cost_table.json` prices each op per sample: profiles of the real models measured on an H200
(every entry says whether it was measured, and where, or derived, and by which rule) and the tiny world's own CPU
costs from `python -m rlstitch.train.cost --calibrate`. A run is priced twice: at the real architecture its
backbone stands for (`projections`: tiny-sd3 -> SD3.5-M, tiny-flux -> FLUX.1-dev, at their 512 px token count;
a real backbone prices at itself) in GPU-seconds, and, for tiny backbones, at its own measured CPU seconds.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("cost_table.json")
OPS = ("denoiser_fwd", "denoiser_bwd", "decode", "reward", "decode_reward_bwd", "value_fwd", "value_bwd")


def load_table(path: str | Path = TABLE) -> dict:
    """The cost table (JSON), with a clear error for a missing or corrupt file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cost table {path}: cannot read it ({e})") from e


def split_op(key: str) -> tuple[str, int | None]:
    """'value_fwd/i=3' -> ('value_fwd', 3); 'decode' -> ('decode', None)."""
    op, _, cut = key.partition("/i=")
    if op not in OPS:
        raise KeyError(f"unknown work op {key!r}; known: {list(OPS)}")
    return op, int(cut) if cut else None


def add_work(total: Counter, work: Mapping[str, float]) -> Counter:
    """total += work (in place; returns total)."""
    for k, v in work.items():
        split_op(k)
        total[k] += float(v)
    return total


def _interp(by_cut: Mapping[str, float], cut: float) -> float:
    """Linear interpolation (and extrapolation from the nearest two) of a cost measured at a few cuts."""
    pts = sorted((int(k), float(v)) for k, v in by_cut.items())
    if len(pts) == 1:
        return pts[0][1] * cut / pts[0][0]  # derived: proportional to the blocks run
    lo, hi = (pts[0], pts[1]) if cut <= pts[0][0] else (pts[-2], pts[-1])
    for a, b in zip(pts, pts[1:]):
        if a[0] <= cut <= b[0]:
            lo, hi = a, b
    return max(lo[1] + (hi[1] - lo[1]) * (cut - lo[0]) / (hi[0] - lo[0]), 0.0)


@dataclass
class CostModel:
    """Seconds per sample of each op for one profile at a token count, and how a source's cuts map onto it."""

    profile: str
    ops: dict  # op -> {"s": seconds} or {"by_cut": {i: seconds}}
    scale: float = 1.0  # run tokens / the profile's measured tokens (derived: costs linear in tokens)
    cut_scale: float = 1.0  # profile blocks / the run backbone's blocks (a tiny cut at the same depth fraction)
    unit: str = "gpu_s"

    def op_seconds(self, key: str) -> float:
        """Seconds for one row of op `key`."""
        op, cut = split_op(key)
        spec = self.ops[op]
        if "by_cut" in spec:
            if cut is None:
                raise KeyError(f"{self.profile}: op {op} needs a cut (value_fwd/i=I)")
            return _interp(spec["by_cut"], cut * self.cut_scale) * self.scale
        return float(spec["s"]) * self.scale

    def seconds(self, work: Mapping[str, float]) -> dict[str, float]:
        """Seconds per op of a work dict (keys as in the work dict)."""
        return {k: float(n) * self.op_seconds(k) for k, n in work.items() if n}

    def total(self, work: Mapping[str, float]) -> float:
        """Seconds of all of a work dict."""
        return sum(self.seconds(work).values())


def latent_tokens(backbone: str, latent_size: int) -> int:
    """Image tokens of a latent_size^2 latent: 2x2 patches (SD3.5, FLUX packing), 1x1 for the tiny backbones."""
    return (latent_size // (1 if backbone.startswith("tiny") else 2)) ** 2


def models_for(backbone: str, tokens: int, table: dict | None = None) -> dict[str, CostModel]:
    """{"gpu_s": the projected model, "cpu_s": the tiny world's own (tiny backbones only)} for a run."""
    table = table or load_table()
    profiles, proj = table["profiles"], table["projections"]
    out = {}
    if backbone in proj:
        p = proj[backbone]
        prof = profiles[p["profile"]]
        out["gpu_s"] = CostModel(p["profile"], prof["ops"], p["tokens"] / prof["tokens"],
                                 prof["blocks"] / p["blocks"], "gpu_s")
    elif backbone in profiles:
        prof = profiles[backbone]
        out["gpu_s"] = CostModel(backbone, prof["ops"], tokens / prof["tokens"], 1.0, "gpu_s")
    else:
        raise KeyError(f"no cost profile for backbone {backbone!r} in {TABLE.name}: add one (profiles or projections)")
    own = table.get("tiny_cpu", {}).get(backbone)
    if own:
        out["cpu_s"] = CostModel(f"{backbone} (CPU)", own["ops"], tokens / own["tokens"], 1.0, "cpu_s")
    return out


def cost_table(work: Mapping[str, float], models: Mapping[str, CostModel]) -> str:
    """Counted work and its cost per op under each model, as a text table."""
    per = {u: m.seconds(work) for u, m in models.items()}
    head = "".join(f"{u + ' (' + m.profile + ')':>30}" for u, m in models.items())
    lines = [f"{'op':<22}{'rows':>12}{head}"]
    for k in sorted(work):
        lines.append(f"{k:<22}{work[k]:>12.0f}" + "".join(f"{per[u].get(k, 0.0):>30.2f}" for u in models))
    lines.append(f"{'total':<22}{'':>12}" + "".join(f"{sum(per[u].values()):>30.2f}" for u in models))
    return "\n".join(lines)


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """after - before for counters (ops absent before count from 0)."""
    return {k: float(v) - float(before.get(k, 0)) for k, v in after.items() if float(v) != float(before.get(k, 0))}


# ------------------------------------------------------------------------------------------- calibration


def _median_s(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(backbone: str, stitch: str, batch: int = 32, repeats: int = 5) -> dict:
    """Per-sample CPU seconds of every op for a tiny backbone, its VAE, tiny CLIP and a committed StitchVM."""
    import torch

    from rlstitch.models.registry import load_backbone, load_codec, load_reward, stitch_dir
    from rlstitch.stitch.artifact import load as load_stitch
    from rlstitch.stitch.artifact import read_manifest
    from rlstitch.train.policy import Policy

    torch.manual_seed(0)
    bb = load_backbone(backbone)
    codec, reward = load_codec("tiny-vae"), load_reward("tiny-clip")
    policy = Policy(bb, True, 32, 64.0)
    z = torch.randn(batch, bb.latent_channels, 8, 8)
    t = torch.full((batch,), 0.5)
    prompts = ["a red circle"] * batch
    cond = bb.encode_prompts(prompts)
    params = policy.trainable_parameters()

    def fwd():
        with torch.no_grad():
            policy.velocity(z, t, cond)

    def fwd_bwd():
        policy.velocity(z, t, cond).square().mean().backward()
        for p in params:
            p.grad = None

    zc = torch.randn(batch, codec.latent_channels, 8, 8)

    def clean():
        with torch.no_grad():
            reward.score(codec.decode(zc), prompts)

    def decode():
        with torch.no_grad():
            codec.decode(zc)

    def clean_grad():
        x = zc.clone().requires_grad_(True)
        reward.score(codec.decode(x), prompts).sum().backward()

    sdir = stitch_dir(stitch)
    vm = load_stitch(sdir, load_backbone(backbone), reward).eval()  # its own copy: LoRA changes the fingerprint
    i = int(read_manifest(sdir)["i"])

    def value():
        with torch.no_grad():
            vm.value(z, t, prompts)

    def value_grad():
        x = z.clone().requires_grad_(True)
        vm.value(x, t, prompts).sum().backward()

    s = {name: _median_s(fn, repeats) / batch for name, fn in
         [("fwd", fwd), ("fwd_bwd", fwd_bwd), ("decode", decode), ("clean", clean), ("clean_grad", clean_grad),
          ("value", value), ("value_grad", value_grad)]}
    src = f"measured here: CPU, 1 thread, batch {batch}, median of {repeats}"
    return {"tokens": 64, "blocks": bb.num_blocks, "source": src, "ops": {
        "denoiser_fwd": {"s": s["fwd"]},
        "denoiser_bwd": {"s": max(s["fwd_bwd"] - s["fwd"], 0.0), "source": "forward+backward minus forward (LoRA)"},
        "decode": {"s": s["decode"]},
        "reward": {"s": max(s["clean"] - s["decode"], 0.0), "source": "decode+reward minus decode"},
        "decode_reward_bwd": {"s": max(s["clean_grad"] - s["clean"], 0.0)},
        "value_fwd": {"by_cut": {str(i): s["value"]}, "source": f"the committed {stitch} (i={i}); other cuts "
                      "derived proportional to i"},
        "value_bwd": {"by_cut": {str(i): max(s["value_grad"] - s["value"], 0.0)}},
    }}


def main(argv: list[str] | None = None) -> None:
    """`--calibrate`: measure the tiny world's CPU costs into the table; otherwise print the table."""
    p = argparse.ArgumentParser(description="rlstitch's compute cost table")
    p.add_argument("--calibrate", action="store_true", help="measure tiny-sd3 / tiny-flux CPU costs (1 thread)")
    p.add_argument("--table", type=Path, default=TABLE)
    a = p.parse_args(argv)
    table = load_table(a.table)
    if a.calibrate:
        import torch

        from rlstitch.io import atomic_write_text

        torch.set_num_threads(1)
        table["tiny_cpu"] = {bb: calibrate(bb, f"{bb}_tiny-clip") for bb in ("tiny-sd3", "tiny-flux")}
        atomic_write_text(a.table, json.dumps(table, indent=2) + "\n")
    for name, prof in {**table["profiles"], **table.get("tiny_cpu", {})}.items():
        print(f"{name} ({prof.get('source', '')[:70]}):")
        for op, spec in prof["ops"].items():
            val = spec.get("s", spec.get("by_cut"))
            print(f"  {op:<20}{val}  {spec.get('source', '')}")


if __name__ == "__main__":
    main()
