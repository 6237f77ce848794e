"""Typed configs: dataclass schema + optional YAML + key=value overrides, validated at start-up."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

PRECISIONS = ("auto", "fp32", "bf16")  # train.precision and finetune.precision


def use_bf16(precision: str, cuda: bool) -> bool:
    """A precision knob's verdict: auto is bf16 on GPU and fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and cuda)


class ConfigError(ValueError):
    """A config that does not fit its schema or fails validation."""


def load_config(schema: type[T], overrides: Sequence[str] = (), yaml: str | Path | None = None) -> T:
    """schema defaults <- YAML file <- key=value overrides; unknown keys and wrong types are errors.

    The result is the dataclass instance; its `validate()` (if any) runs before it is returned.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        cfg = OmegaConf.structured(schema)
        if yaml is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(yaml))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad config{f' key {key!r}' if key else ''}: {e.msg if hasattr(e, 'msg') else e}") from e
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def config_file(name: str, folder: str | Path) -> Path:
    """A recipe's config by name (a file of its folder, recipes/configs/<recipe>/) or a YAML path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(folder) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(folder).glob("*.yaml"))
        raise ConfigError(f"config={name!r}: no file {path}; known configs: {known} (or give a YAML path)")
    return path


def load_recipe_config(schema: type[T], argv: Sequence[str], folder: str | Path, default: str = "tiny") -> T:
    """`config=NAME` (a file of `folder`, default `default`, or a YAML path) and key=value overrides -> a
    validated config: the one lookup every recipe uses."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("config=")), default)
    return load_config(schema, [a for a in argv if not a.startswith("config=")], config_file(name, folder))


def to_dict(cfg) -> dict:
    """A plain dict of a (nested) dataclass config, for manifests and logs."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
