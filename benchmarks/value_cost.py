"""Cost of one value call, StitchVM vs Tweedie, at the real models' architectures (random weights).

    python benchmarks/value_cost.py --preset sd35-medium --reward clip-vit-l-14 --cuts 4,8,12 --batch 4 \
        --json /tmp/cost.json        # on a GPU (bf16); --preset tiny runs the tiny world's shapes on the CPU

Time and memory depend on shapes, not on weight values, so this builds each model from its published
architecture config with random weights (nothing is downloaded) and measures, in one process and one run:
- Tweedie `value` / `value_and_grad` (denoiser + VAE decoder + reward, backward through all three);
- StitchVM at each DiT cut i (blocks 1..i + stitch + reward tail from j, backward through those);
- one CFG velocity call (the sampler's own cost per step), so that a DPS step costs `cfg + value_and_grad`.
- with --dps-steps N, whole DPS samples (`dps_sample`: N SDE steps, CFG 4.5, final decode) unguided, with
  Tweedie and with StitchVM at each cut: seconds per sample and working memory.
Times are medians (CUDA-synchronised on a GPU); memory is what `value_and_grad` allocates above the resident
weights (the peak minus what was allocated before the call), plus each estimator's resident weights.
The text conditions are zeros of the real token counts (the DiT's cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bootstrap import ROOT

from rlstitch.eval.fidelity import cost, median_ms, peak_mb
from rlstitch.io import atomic_write_text
from rlstitch.models.backbone import FluxBackbone, SD3Backbone
from rlstitch.models.codec import LatentCodec
from rlstitch.models.condition import Condition
from rlstitch.models.reward import ClipReward
from rlstitch.sampling.flow import FlowSampler
from rlstitch.sampling.generate import cfg_velocity
from rlstitch.sampling.guidance import dps_sample
from rlstitch.stitch.layer import StitchLayer
from rlstitch.stitch.vm import StitchVM
from rlstitch.value.estimators import Tweedie

TINY = ROOT / "rlstitch" / "tinyworld" / "weights"
SD3_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=16,
               norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
# Published diffusers configs (transformer/config.json, vae/config.json) and the pipelines' text token counts.
PRESETS = {
    "sd35-medium": dict(family="sd3", resolution=1024, text_tokens=333, dit=dict(
        attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128),
        vae=dict(SD3_VAE, scaling_factor=1.5305, shift_factor=0.0609)),
    "sd35-large": dict(family="sd3", resolution=1024, text_tokens=333, dit=dict(
        attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
        num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128),
        vae=dict(SD3_VAE, scaling_factor=1.5305, shift_factor=0.0609)),
    "flux-dev": dict(family="flux", resolution=1024, text_tokens=512, dit=dict(
        attention_head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=True, in_channels=64,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
        pooled_projection_dim=768), vae=dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)),
    "tiny": dict(family="sd3", resolution=32, text_tokens=12, dit="sd3", vae="vae"),
}
REWARDS = {"clip-vit-l-14": "ViT-L-14", "hpsv2": "ViT-H-14", "tiny": "clip"}


def _config(spec) -> dict:
    """A preset's config dict, or the committed tiny model's config.json."""
    if isinstance(spec, dict):
        return spec
    cfg = json.loads((TINY / spec / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_backbone(preset: dict, device, dtype):
    """A random-weight SD3 / FLUX transformer of the preset's architecture, with a zero text condition."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if preset["family"] == "sd3" else FluxTransformer2DModel
    with torch.device(device):
        model = cls.from_config(_config(preset["dit"])).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL.from_config(_config(preset["vae"])).to(dtype).eval().requires_grad_(False)
    cfg = model.config
    n_txt = preset["text_tokens"]

    def text(prompts):
        """Zeros shaped like the pipeline's text condition."""
        return Condition(torch.zeros(len(prompts), n_txt, cfg.joint_attention_dim, device=device),
                         torch.zeros(len(prompts), cfg.pooled_projection_dim, device=device))

    if preset["family"] == "sd3":
        backbone = SD3Backbone(model, text, name="random-sd3")
    else:
        backbone = FluxBackbone(model, text, name="random-flux", pack=2, guidance=3.5)
    return backbone, LatentCodec(vae, name="random-vae")


def build_reward(name: str, device, dtype) -> ClipReward:
    """A random-weight open_clip ViT reward (the tiny world's CLIP shape for 'tiny')."""
    import open_clip

    if name == "tiny":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        from rlstitch.models.tokenizer import WordTokenizer

        cfg = json.loads((TINY / "clip" / "config.json").read_text())
        clip = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]))
        tok = WordTokenizer(cfg["tokenizer"]["words"], cfg["text_cfg"]["context_length"])
    else:
        clip, tok = open_clip.create_model(REWARDS[name], device=device), open_clip.get_tokenizer(REWARDS[name])
    return ClipReward(clip.to(device, dtype).eval().requires_grad_(False), tok, name=f"random-{name}")


def safe_cost(method, z, prompts, repeats: int) -> dict:
    """fidelity.cost, or {"error": ...} when the GPU runs out of memory (the other estimators still run)."""
    try:
        return cost(method, z, prompts, repeats)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}


def weights_mb(*modules) -> float:
    """Resident parameter memory of the given modules (shared parameters counted once)."""
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values()) / 2**20


def measure(preset_name: str, reward_name: str, cuts: list[int], batch: int, device: str, dtype, repeats: int,
            dps_steps: int = 0) -> dict:
    """Cost of Tweedie, StitchVM at each cut and one CFG velocity call, in one process."""
    preset = PRESETS[preset_name]
    backbone, codec = build_backbone(preset, device, dtype)
    bad = [i for i in cuts if not 1 <= i <= backbone.num_blocks]
    if bad:
        raise ValueError(f"cut {bad[0]} is outside the DiT's 1..{backbone.num_blocks} blocks")
    reward = build_reward(reward_name, device, dtype)
    hw = preset["resolution"] // codec.downsample
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(batch, backbone.latent_channels, hw, hw, device=device, generator=gen)
    prompts = ["a photo of a cat"] * batch
    res = {"preset": preset_name, "reward": reward_name, "batch": batch, "device": device, "dtype": str(dtype),
           "latent": list(z.shape), "dit_blocks": backbone.num_blocks, "reward_blocks": reward.num_blocks}
    tweedie = Tweedie(backbone, codec, reward)
    res["tweedie"] = {**safe_cost(tweedie, z, prompts, repeats), "weights_mb": weights_mb(backbone, codec, reward)}
    print(f"tweedie: {res['tweedie']}", flush=True)
    res["stitchvm"] = {}
    estimators = {"flow": None, "tweedie": tweedie}
    grid_u = backbone.grid((hw, hw))
    for i in cuts:
        with torch.device(device):
            layer = StitchLayer(backbone.hidden_dim, reward.width, grid_u, reward.grid).to(dtype)
        vm = StitchVM(backbone, reward, layer, i=i, j=0)
        blocks = list(backbone.model.transformer_blocks) + list(
            getattr(backbone.model, "single_transformer_blocks", []))
        held = [m for name, m in backbone.model.named_children() if "blocks" not in name] + blocks[:i]
        res["stitchvm"][str(i)] = {**safe_cost(vm, z, prompts, repeats), "weights_mb": weights_mb(layer, vm.tail, *held)}
        print(f"stitchvm i={i}: {res['stitchvm'][str(i)]}", flush=True)
        estimators[f"stitchvm i={i}"] = vm
    cfg = cfg_velocity(backbone, backbone.encode_prompts(prompts), 4.5)
    with torch.no_grad():
        res["cfg_ms"] = median_ms(lambda: cfg(z, 0.5), repeats)
    if dps_steps:
        res["dps"] = {name: dps_cost(name, backbone, codec, est, prompts, hw, dps_steps) for name, est in estimators.items()}
        res["dps_steps"] = dps_steps
    return res


def dps_cost(name: str, backbone, codec, value_model, prompts, hw: int, steps: int) -> dict:
    """Seconds per sample and memory of one whole DPS sampling run (CFG 4.5, SDE, final decode).

    The guidance scale is tiny: the cost does not depend on it, and random weights would blow a real scale up.
    """
    def run():
        dps_sample(backbone, codec, value_model, prompts, scale=1e-3 if value_model else 0.0, cfg_scale=4.5,
                   sampler=FlowSampler(steps=steps, sde=True), latent_hw=(hw, hw))

    try:
        sec = median_ms(run, 2) / 1000 / len(prompts)
        out = {"sec_per_sample": sec, "peak_mb": peak_mb(run)}
    except (torch.cuda.OutOfMemoryError, ValueError) as e:
        torch.cuda.empty_cache()
        out = {"error": str(e).splitlines()[0]}
    print(f"dps {name}: {out}", flush=True)
    return out


def report(res: dict) -> None:
    """A table of the figures and the ratios to Tweedie."""
    tw = res["tweedie"]
    print(f"\n{res['preset']} x {res['reward']}, batch {res['batch']}, {res['device']} {res['dtype']}, "
          f"latent {res['latent']}, {res['dit_blocks']} DiT blocks")
    print(f"{'estimator':<16}{'value ms':>10}{'v&g ms':>10}{'v&g work MB':>13}{'weights MB':>12}"
          f"{'v&g speed-up':>14}{'DPS step speed-up':>19}")
    rows = [("tweedie", tw)] + [(f"stitchvm i={i}", c) for i, c in res["stitchvm"].items()]
    for name, c in rows:
        if "error" in c or "error" in tw:
            print(f"{name:<16}{c.get('error') or tw.get('error')}")
            continue
        step = (res["cfg_ms"] + tw["grad_ms"]) / (res["cfg_ms"] + c["grad_ms"])
        print(f"{name:<16}{c['value_ms']:>10.1f}{c['grad_ms']:>10.1f}{c['grad_peak_mb']:>13.0f}{c['weights_mb']:>12.0f}"
              f"{tw['grad_ms'] / c['grad_ms']:>13.2f}x{step:>18.2f}x")
    print(f"one CFG velocity call (the sampler's step): {res['cfg_ms']:.1f} ms")
    if "dps" in res:
        print(f"whole DPS sample, {res['dps_steps']} SDE steps, CFG 4.5, final decode (s/sample, work MB):")
        for name, d in res["dps"].items():
            print(f"  {name:<14}" + (d["error"] if "error" in d else f"{d['sec_per_sample']:.3f} s  {d['peak_mb']:.0f} MB"))


def main(argv=None) -> dict:
    """Parse arguments, measure, print, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--reward", choices=sorted(REWARDS), default="tiny")
    p.add_argument("--cuts", default="4", help="comma-separated DiT cuts i")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="bf16 on GPU, fp32 on CPU")
    p.add_argument("--dps-steps", type=int, default=0, help="also time whole DPS samples with this many steps")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)
    cuts = [int(c) for c in a.cuts.split(",")]
    res = measure(a.preset, a.reward, cuts, a.batch, a.device, dtype, a.repeats, a.dps_steps)
    report(res)
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
