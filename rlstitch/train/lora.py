"""peft LoRA on the attention projections of diffusers SD3 / FLUX transformers, with named adapter slots.

A model can hold several adapters of the same shape ("default" is trained; DiffusionNFT keeps its old policy
in "old"). `use_adapter` / `adapters_disabled` switch which one the forward uses WITHOUT touching
`requires_grad` (peft's own `set_adapter` / `enable_adapters` flip it, which would silently change what an
already-built optimizer or DeepSpeed engine trains). Adapter state dicts are keyed without the slot name, so
weights move between slots and between processes (weight sync) unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

# Every attention projection of diffusers' SD3 (JointTransformerBlock) and FLUX (double and single stream)
# blocks: image-stream q/k/v/out and text-stream q/k/v/out. peft matches them as module-name suffixes.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT = "default"


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside a model."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def add_lora(model: nn.Module, rank: int = 32, alpha: float = 64, targets: Sequence[str] = ATTENTION_TARGETS,
             names: Sequence[str] = (DEFAULT,), seed: int = 0) -> nn.Module:
    """Inject LoRA adapters (one per name, identical init: B = 0) into `model` in place; only "default" trains."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank} (use lora.enabled=false for full finetuning)")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=True)
    for name in names:
        torch.manual_seed(seed)  # same A init in every process, so rollout and learner start identical
        with warnings.catch_warnings():  # several named adapters in one model are intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(cfg, model, adapter_name=name)
    if not _lora_layers(model):
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if f".{DEFAULT}." in n and "lora_" in n:
            p.requires_grad_(True)
    _set_active(model, DEFAULT)
    return model


def _set_active(model: nn.Module, name: str) -> None:
    """Route every LoRA layer's forward through adapter `name` (requires_grad untouched)."""
    for layer in _lora_layers(model):
        if name not in layer.lora_A:
            raise KeyError(f"no LoRA adapter {name!r}; have {sorted(layer.lora_A)}")
        layer._active_adapter = [name]


def _set_disabled(model: nn.Module, disabled: bool) -> None:
    """Bypass (or re-enable) every LoRA layer (requires_grad untouched)."""
    for layer in _lora_layers(model):
        layer._disable_adapters = disabled


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Forward passes inside the block use adapter `name`; the default adapter is active again afterwards."""
    _set_active(model, name)
    try:
        yield
    finally:
        _set_active(model, DEFAULT)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Forward passes inside the block run the base model (the KL reference)."""
    _set_disabled(model, True)
    try:
        yield
    finally:
        _set_disabled(model, False)


def _slot_key(key: str, name: str) -> str | None:
    """'blocks.0.attn.to_q.lora_A.old.weight' -> 'blocks.0.attn.to_q.lora_A.weight' for slot 'old', else None."""
    tag = f".{name}."
    if "lora_" not in key or tag not in key:
        return None
    return key.replace(tag, ".", 1)


def adapter_state(model: nn.Module, name: str = DEFAULT) -> dict[str, Tensor]:
    """The adapter weights of slot `name` (detached CPU float32 copies), keyed without the slot name."""
    out = {}
    for k, v in model.state_dict().items():
        plain = _slot_key(k, name)
        if plain is not None:
            out[plain] = v.detach().to("cpu", torch.float32).clone()
    if not out:
        raise KeyError(f"model has no LoRA adapter {name!r}")
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor], name: str = DEFAULT) -> None:
    """Copy adapter weights (as from `adapter_state`) into slot `name`, in place; keys must match exactly."""
    params = {}
    for k, p in model.named_parameters():
        plain = _slot_key(k, name)
        if plain is not None:
            params[plain] = p
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"adapter {name!r}: missing {missing[:3]}... extra {extra[:3]}... (LoRA config differs?)")
    for k, p in params.items():
        p.copy_(state[k].to(p.device, p.dtype))


def adapter_params(model: nn.Module, name: str = DEFAULT) -> dict[str, nn.Parameter]:
    """The parameters of adapter slot `name`, keyed without the slot name."""
    out = {}
    for k, p in model.named_parameters():
        plain = _slot_key(k, name)
        if plain is not None:
            out[plain] = p
    return out


@torch.no_grad()
def lerp_(target: dict[str, Tensor], source: dict[str, Tensor], keep: float) -> None:
    """target <- keep * target + (1 - keep) * source, in place (EMA / old-policy update)."""
    for k, t in target.items():
        t.mul_(keep).add_(source[k].to(t.device, t.dtype), alpha=1.0 - keep)


def state_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of a state dict's tensors (what a weight sync sends)."""
    return sum(v.numel() * v.element_size() for v in state.values())
