"""Names -> loaders for backbones, rewards and codecs. Weights come from a local folder or the local hub cache.

Nothing is ever randomly initialised here: missing weights raise WeightsNotFoundError naming what to
download and where to put it. Downloads happen only with allow_download=True.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rlstitch.io import atomic_save, atomic_write_text
from rlstitch.models.backbone import DiffusionBackbone, FluxBackbone, SD3Backbone
from rlstitch.models.codec import LatentCodec
from rlstitch.models.reward import OPENAI_MEAN, OPENAI_STD, AestheticMLP, AestheticReward, ClipReward
from rlstitch.models.tokenizer import WordTokenizer

TINY_DIR = Path(__file__).resolve().parent.parent / "tinyworld" / "weights"


def tiny_root(tiny_dir: str | Path | None = None) -> Path:
    """Where the tiny world's weights live: `tiny_dir` when given, else $RLSTITCH_TINY_DIR (tests, rebuilt
    worlds), else the package's copy."""
    return Path(tiny_dir or os.environ.get("RLSTITCH_TINY_DIR") or TINY_DIR)


DEVICES = ("auto", "cpu", "cuda")


def check_device(name: str, knob: str = "device") -> None:
    """A device setting must be one of DEVICES (checkable where the GPU is not: a Ray driver). `knob` names it."""
    if name not in DEVICES:
        raise ValueError(f"{knob}={name!r} must be one of {DEVICES}")


def resolve_device(name: str, knob: str = "device") -> torch.device:
    """'cuda' / 'cpu', or 'auto': cuda when this process sees a GPU. `knob` names the setting in errors."""
    check_device(name, knob)
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{knob}=cuda but this process sees no GPU (use {knob}=auto or cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class WeightsNotFoundError(FileNotFoundError):
    """Raised when a model's weights are not where the registry looked."""


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone lives and how to adapt it."""

    family: str  # sd3 | flux
    hub: str  # hub id, or a folder name under TINY_DIR for tiny models
    text: str  # text encoder: "pipeline" (the hub repo's own encoders) or a tiny text encoder name
    vae: str  # codec name
    pack: int = 2
    guidance: float = 3.5


BACKBONES = {
    "sd35-medium": BackboneSpec("sd3", "stabilityai/stable-diffusion-3.5-medium", "pipeline", "sd35-vae"),
    "sd35-large": BackboneSpec("sd3", "stabilityai/stable-diffusion-3.5-large", "pipeline", "sd35-vae"),
    "flux-dev": BackboneSpec("flux", "black-forest-labs/FLUX.1-dev", "pipeline", "flux-vae"),
    "tiny-sd3": BackboneSpec("sd3", "sd3", "tiny-text", "tiny-vae"),
    "tiny-flux": BackboneSpec("flux", "flux", "tiny-text", "tiny-vae", pack=1, guidance=0.0),
}
CODECS = {
    "sd35-vae": "stabilityai/stable-diffusion-3.5-medium",
    "flux-vae": "black-forest-labs/FLUX.1-dev",
    "tiny-vae": "vae",
}
# reward name -> (open_clip architecture, default checkpoint file name inside the weights folder, hub hint)
CLIP_REWARDS = {
    "clip-vit-l-14": ("ViT-L-14", "open_clip_model.safetensors", "openai/clip-vit-large-patch14 (open_clip 'openai')"),
    "dfn-clip-vit-h-14": ("ViT-H-14-quickgelu", "open_clip_model.safetensors", "apple/DFN5B-CLIP-ViT-H-14"),
    "hpsv2": ("ViT-H-14", "HPS_v2.1_compressed.safetensors", "xswu/HPSv2 (convert the .pt to safetensors)"),
}


# Committed StitchVM artifacts of the tiny world (folders under the tiny-world weights).
STITCHES = {
    "tiny-sd3_tiny-clip": "stitchvm/sd3-clip",
    "tiny-flux_tiny-clip": "stitchvm/flux-clip",
    "tiny-sd3_tiny-aesthetic": "stitchvm/sd3-aesthetic",
}


def stitch_dir(name_or_path: str) -> Path:
    """A StitchVM artifact folder from a registry name (committed tiny stitches) or a path."""
    d = tiny_root() / STITCHES[name_or_path] if name_or_path in STITCHES else Path(name_or_path)
    if not (d / "manifest.json").is_file():
        raise WeightsNotFoundError(f"no StitchVM artifact at {d}: build one with `python -m rlstitch.stitch.build`")
    return d


def _missing(name: str, where: str, hint: str, cause: BaseException | None = None) -> WeightsNotFoundError:
    """A clear error naming what to download and where to put it (and why loading failed, when known)."""
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
    return WeightsNotFoundError(
        f"weights for {name!r} not found or unreadable at {where}{why}. Download {hint} and pass its local folder "
        f"(e.g. model.path=/mnt/weights/{name}); rlstitch never falls back to random weights."
    )


def _tiny_dir(folder: str, path: str | Path | None, tiny_dir: str | Path | None = None) -> Path:
    """The folder of a tiny-world model (under `tiny_dir` or tiny_root()), checked for its files."""
    d = Path(path) if path else tiny_root(tiny_dir) / folder
    if not (d / "config.json").is_file():
        raise _missing(f"tiny-{folder}", str(d), "nothing: run `python -m rlstitch.tinyworld.build`")
    return d


def _safetensors(file: Path, name: str) -> dict:
    """A safetensors file's tensors; a missing or unreadable file is a clear error naming it."""
    if not file.is_file():
        raise _missing(name, str(file), "nothing: run `python -m rlstitch.tinyworld.build`")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _from_pretrained(cls, name: str, source: str, hub: str, subfolder: str, dtype, allow_download: bool):
    """diffusers from_pretrained (local files only unless allowed) with a clear error naming the hub repo."""
    try:
        return cls.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, local_files_only=not allow_download,
                                   use_safetensors=True)  # never fall back to a pickled .bin
    except (OSError, ValueError) as e:
        raise _missing(name, f"{source} (subfolder {subfolder}/)", f"the hub repo {hub!r}", e) from e


def load_codec(name: str, path: str | None = None, dtype=torch.float32, device="cpu", allow_download=False,
               tiny_dir: str | Path | None = None):
    """A LatentCodec by registry name (tiny ones from `tiny_dir`, default tiny_root())."""
    from diffusers import AutoencoderKL

    if name not in CODECS:
        raise KeyError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    if name.startswith("tiny-"):
        vae = AutoencoderKL.from_pretrained(_tiny_dir(CODECS[name], path, tiny_dir), torch_dtype=dtype, use_safetensors=True)
    else:
        vae = _from_pretrained(AutoencoderKL, name, path or CODECS[name], CODECS[name], "vae", dtype, allow_download)
    return LatentCodec(vae.to(device).eval().requires_grad_(False), name=name)


def load_backbone(
    name: str, path: str | None = None, dtype=torch.float32, device="cpu", with_text: bool = True, allow_download=False
) -> DiffusionBackbone:
    """A frozen DiffusionBackbone by registry name (with its text encoder unless with_text=False)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    cls = SD3Transformer2DModel if spec.family == "sd3" else FluxTransformer2DModel
    if name.startswith("tiny-"):
        model = cls.from_pretrained(_tiny_dir(spec.hub, path), torch_dtype=dtype, use_safetensors=True)
    else:
        model = _from_pretrained(cls, name, path or spec.hub, spec.hub, "transformer", dtype, allow_download)
    model = model.to(device).eval().requires_grad_(False)
    text = None
    if with_text:
        text = _pipeline_text(spec, path or spec.hub, dtype, device) if spec.text == "pipeline" else (
            load_text_encoder(spec.text, device=device).text_condition
        )
    if spec.family == "sd3":
        return SD3Backbone(model, text, name=name)
    return FluxBackbone(model, text, name=name, pack=spec.pack, guidance=spec.guidance)


def _pipeline_text(spec: BackboneSpec, source: str, dtype, device):
    """The hub repo's own text encoders (CLIP-L/G + T5) as a prompt -> Condition function, loaded lazily."""
    from rlstitch.models.condition import Condition

    state = {}

    def encode(prompts):
        if "pipe" not in state:
            from diffusers import FluxPipeline, StableDiffusion3Pipeline

            cls = StableDiffusion3Pipeline if spec.family == "sd3" else FluxPipeline
            try:
                state["pipe"] = cls.from_pretrained(source, transformer=None, vae=None, torch_dtype=dtype,
                                                    local_files_only=True, use_safetensors=True).to(device)
            except (OSError, ValueError) as e:
                raise _missing(f"{source} text encoders", source, f"the hub repo {source!r}", e) from e
        pipe = state["pipe"]
        if spec.family == "sd3":
            tokens, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        else:
            tokens, pooled, _ = pipe.encode_prompt(prompts, None)
        return Condition(tokens, pooled)

    return encode


def _tiny_clip(d: Path, dtype, device) -> tuple[torch.nn.Module, WordTokenizer, dict]:
    """Build the tiny open_clip CLIP from its config and load its safetensors weights (a text-only file may
    leave the image tower out, which then stays unused)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = json.loads((d / "config.json").read_text())
    clip = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]))
    missing, unexpected = clip.load_state_dict(_safetensors(d / "model.safetensors", f"tiny-{d.name}"), strict=False)
    if unexpected or (missing and not (cfg.get("text_only") and all(k.startswith("visual.") for k in missing))):
        raise ValueError(f"{d / 'model.safetensors'} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    tok = WordTokenizer(cfg["tokenizer"]["words"], cfg["text_cfg"]["context_length"])
    return clip.to(device, dtype).eval().requires_grad_(False), tok, cfg


def _open_clip(name: str, path: str | None, dtype, device):
    """A real open_clip model from a local safetensors checkpoint, with its tokenizer."""
    import open_clip

    arch, fname, hint = CLIP_REWARDS[name]
    ckpt = Path(path) / fname if path and Path(path).is_dir() else Path(path) if path else None
    if ckpt is None or not ckpt.is_file():
        raise _missing(name, str(ckpt), hint)
    if ckpt.suffix != ".safetensors":  # open_clip would torch.load (unpickle) any other file
        raise ValueError(f"{ckpt}: only .safetensors checkpoints are loaded; convert it ({hint})")
    model = open_clip.create_model(arch, pretrained=str(ckpt), precision="fp32")
    return model.to(device, dtype).eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def load_reward(name: str, path: str | None = None, dtype=torch.float32, device="cpu",
                tiny_dir: str | Path | None = None):
    """A frozen PixelReward by registry name (tiny ones from `tiny_dir`, default tiny_root())."""
    if name in ("tiny-clip", "tiny-aesthetic"):
        clip, tok, cfg = _tiny_clip(_tiny_dir("clip", path if name == "tiny-clip" else None, tiny_dir), dtype, device)
        kw = dict(mean=cfg.get("mean", OPENAI_MEAN), std=cfg.get("std", OPENAI_STD), name=name)
        if name == "tiny-clip":
            return ClipReward(clip, tok, **kw)
        d = _tiny_dir("aesthetic", path, tiny_dir)
        head = load_aesthetic_head(d / "model.safetensors", json.loads((d / "config.json").read_text())["hidden"])
        return AestheticReward(clip, tok, head.to(device, dtype), **kw).eval().requires_grad_(False)
    if name in CLIP_REWARDS:
        clip, tok = _open_clip(name, path, dtype, device)
        return ClipReward(clip, tok, name=name)
    if name == "aesthetic":
        d = Path(path) if path else None
        if d is None or not (d / "aesthetic_mlp.safetensors").is_file():
            raise _missing(name, str(d), "the LAION aesthetic predictor (sac+logos+ava1-l14-linearMSE, converted "
                           "to aesthetic_mlp.safetensors) and CLIP ViT-L/14 (open_clip_model.safetensors)")
        clip, tok = _open_clip("clip-vit-l-14", str(d), dtype, device)
        head = load_aesthetic_head(d / "aesthetic_mlp.safetensors", (1024, 128, 64, 16))
        return AestheticReward(clip, tok, head.to(device, dtype), name=name).eval().requires_grad_(False)
    raise KeyError(f"unknown reward {name!r}; known: {sorted([*CLIP_REWARDS, 'aesthetic', 'tiny-clip', 'tiny-aesthetic'])}")


def load_text_encoder(name: str, path: str | None = None, dtype=torch.float32, device="cpu") -> ClipReward:
    """A tiny world's frozen text encoder (the text tower of its first CLIP), which conditions the generators."""
    if name != "tiny-text":
        raise KeyError(f"unknown text encoder {name!r}; known: ['tiny-text'] (real backbones use their pipeline's)")
    clip, tok, cfg = _tiny_clip(_tiny_dir("text_encoder", path), dtype, device)
    return ClipReward(clip, tok, name=name)


def load_aesthetic_head(file: Path, hidden) -> AestheticMLP:
    """The aesthetic MLP from a safetensors file (input width read from the weights)."""
    state = _safetensors(Path(file), "aesthetic")
    try:
        head = AestheticMLP(state["layers.0.weight"].shape[1], tuple(hidden))
        head.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{file} does not hold the aesthetic MLP with hidden sizes {list(hidden)}: {e}") from e
    return head.eval().requires_grad_(False)


def save_tiny_clip(clip: torch.nn.Module, cfg: dict, out: Path, text_only: bool = False) -> None:
    """Write a tiny open_clip model (or only its text tower) as config.json + model.safetensors (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in clip.state_dict().items() if not (text_only and k.startswith("visual."))}
    atomic_save(state, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps({**cfg, "text_only": text_only}, indent=2))
